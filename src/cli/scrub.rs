//! `drvault verify` and `drvault gc`: start the job, follow it, print its report. Exit status 0
//! when the run succeeded (and, for verify, found the scope clean), [`super::exit::DAMAGE`] when
//! verify found damage, otherwise what [`super::exit`] says of the error.

use anyhow::Result;

use super::operator::Conn;
use crate::client::Client;
use crate::wire::{DamagedObject, GcReport, GcRequest, JobState, VerifyReport, VerifyRequest};

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
        let what = format!("job {} ({})", job.id, job.title);
        return Err(super::JobFailed::new(what, &job).into());
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
        super::print_json(&r)?;
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
            print_damaged(o);
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
    Ok(if r.clean {
        super::exit::OK
    } else {
        super::exit::DAMAGE
    })
}

/// One damaged object and what needs it (verify's report and `drvault damage`).
fn print_damaged(o: &DamagedObject) {
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

/// `drvault damage`: the damage register as it stands (what verify found and no upload has
/// healed yet), without running a verify.
pub async fn damage(json: bool, conn: Conn) -> Result<i32> {
    let r = conn.client()?.damage().await?;
    if json {
        super::print_json(&r)?;
        return Ok(0);
    }
    for o in r.objects.values() {
        print_damaged(o);
    }
    if r.objects.is_empty() {
        println!("no damaged objects registered");
    }
    for k in &r.healed {
        println!("stored again since (the next verify reports it healed): {k}");
    }
    match r.last_verify_unix {
        Some(t) => println!("last full verify: {}", crate::util::rfc3339(t)),
        None => println!("no full verify yet"),
    }
    Ok(0)
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
        super::print_json(&r)?;
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
