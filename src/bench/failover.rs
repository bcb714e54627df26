//! `drvault bench failover`: how fast a test failover materializes a protected disk as a fixed
//! VHD, next to `qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on` of the same
//! plaintext raw image in the same run.
//!
//! One server (spawned, or the one `--creds`/`--token` name) protects the image once as a VM
//! with one disk and no NICs; then each round runs a test failover (`POST /v1/vms/{vm}/failover
//! {"kind":"test"}`, polling its job every 5 ms until it succeeds), checks the VHD it wrote
//! against the raw image byte for byte when the output is on this machine, cleans the drill up,
//! and runs the qemu-img baseline. Figures are medians over the rounds.
//!
//! Decisions the brief left open:
//! * Our time is the whole failover job as the operator sees it (point choice, materialization,
//!   address assignment, definition files), from the request to the job's success; the disk
//!   is the job's only large work. MB/s is the disk's virtual size per second, as for qemu-img.
//! * The failover fsyncs the VHD before it succeeds; `qemu-img convert` does not flush by
//!   default (its cache mode is `unsafe` for the output), so the baseline is convert followed
//!   by `sync FILE`; convert alone is reported too.
//! * The vault and the raw image are both in the page cache (just written / read once), so the
//!   comparison is CPU and write speed, not cold reads.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Serialize;

use super::baselines::{self, Outcome};
use super::images;
use super::procstat::{clock_ticks_per_second, cpu_ticks};
use super::report::{self, Figure, ImageInfo};
use super::server::{run_tag, RunClients, Target, TargetArgs};
use super::{io_err, BenchError};
use crate::format::image::ImageFormat;

#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub image: images::ImageArgs,
    /// Measured rounds (failover + cleanup + baseline); figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Discarded rounds before the measured ones: on a virtual machine, the first failover
    /// after protection writes into memory the host has taken back, and pays for it.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Skip the qemu-img baseline.
    #[arg(long)]
    pub no_baselines: bool,
    /// Print one JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverRun {
    /// From the failover request to its job's success.
    pub failover_s: f64,
    /// Disk bytes per second.
    pub materialize_mb_s: f64,
    pub disk_bytes: u64,
    /// CPU seconds the spawned server used during the failover (None for an existing server).
    pub server_cpu_s: Option<f64>,
    /// The VHD's size (virtual size rounded up to whole MiB, plus the 512-byte footer).
    pub vhd_bytes: Option<u64>,
    /// Whether the VHD's data equals the raw image (None: the output is not on this machine).
    pub vhd_identical: Option<bool>,
    pub cleanup_s: f64,
    pub qemu_convert: Outcome,
    pub qemu_convert_sync: Outcome,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub tool: &'static str,
    pub version: &'static str,
    pub image: ImageInfo,
    pub server: String,
    pub protect_s: f64,
    pub figures: Vec<Figure>,
    pub runs: Vec<FailoverRun>,
    pub notes: Vec<String>,
}

pub async fn run(args: FailoverArgs) -> Result<i32, BenchError> {
    if args.runs == 0 {
        return Err(BenchError::Invalid("--runs must be at least 1".into()));
    }
    let target = Target::from_args(&args.target)?;
    let p = images::prepare(&args.image).await?;
    let run_dir = p.work.join("runs").join("failover");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(io_err("creating", &run_dir))?;
    // qemu-img and the check read a plaintext raw file: the image itself, or a raw copy.
    let raw = if p.image.format() == ImageFormat::Raw {
        p.path.clone()
    } else {
        let out = run_dir.join("plain.raw");
        let (img, o2) = (p.image.clone(), out.clone());
        tokio::task::spawn_blocking(move || images::write_raw(img.as_ref(), &o2))
            .await
            .map_err(|e| BenchError::Invalid(format!("raw copy stopped: {e}")))??;
        out
    };
    images::warm_page_cache(&raw)?;
    let session = target.session(&run_dir).await?;
    let result = measure(&session, &args, &p, &raw, &run_dir).await;
    let stopped = session.finish().await;
    let _ = std::fs::remove_dir_all(&run_dir);
    let (protect_s, runs) = result?;
    stopped?;
    let mut r = build(p.info, target.describe(), protect_s, runs);
    if args.warmup > 0 {
        r.notes.push(format!(
            "{} warm-up round(s) of failover and baseline ran first and were discarded",
            args.warmup
        ));
    }
    if args.json {
        println!("{}", report::json(&r)?);
    } else {
        print!("{}", table(&r));
    }
    Ok(0)
}

async fn measure(
    session: &RunClients,
    args: &FailoverArgs,
    p: &images::Prepared,
    raw: &std::path::Path,
    run_dir: &std::path::Path,
) -> Result<(f64, Vec<FailoverRun>), BenchError> {
    let vm = format!("bench-failover-{}", run_tag());
    eprintln!("bench: protecting {vm}");
    let t = Instant::now();
    session.protect(&vm, &p.path, p.image.clone()).await?;
    let protect_s = t.elapsed().as_secs_f64();
    let tck = clock_ticks_per_second();
    let size = p.image.virtual_size();
    let mut runs = Vec::new();
    for k in 0..args.warmup + args.runs {
        let warm = k < args.warmup;
        if warm {
            eprintln!("bench: warm-up round (discarded): test failover of {vm}");
        } else {
            eprintln!(
                "bench: round {}/{}: test failover of {vm}",
                k - args.warmup + 1,
                args.runs
            );
        }
        let pid = session.server.as_ref().map(|s| s.pid.to_string());
        let cpu0 = pid.as_deref().map(cpu_ticks).transpose()?;
        let t = Instant::now();
        let rec: serde_json::Value = session
            .operator
            .send_json(
                Method::POST,
                &format!("/v1/vms/{vm}/failover"),
                &serde_json::json!({ "kind": "test" }),
            )
            .await?;
        let job = rec["job"]
            .as_str()
            .ok_or_else(|| BenchError::Server(format!("failover answer without a job: {rec}")))?;
        session.wait_job(job, Duration::from_millis(5)).await?;
        let failover_s = t.elapsed().as_secs_f64();
        let server_cpu_s = match (pid.as_deref(), cpu0) {
            (Some(p), Some(c0)) => {
                Some(cpu_ticks(p)?.own.saturating_sub(c0.own) as f64 / tck as f64)
            }
            _ => None,
        };
        let view: serde_json::Value = session
            .operator
            .get_json(&format!("/v1/vms/{vm}/failover"))
            .await?;
        let vhd = view["record"]["files"]
            .as_array()
            .and_then(|f| {
                f.iter()
                    .filter_map(|x| x.as_str())
                    .find(|x| x.ends_with(".vhd"))
            })
            .map(PathBuf::from);
        let (vhd_bytes, vhd_identical) = match vhd.filter(|v| v.exists()) {
            Some(v) => {
                let bytes = std::fs::metadata(&v).map_err(io_err("reading", &v))?.len();
                let r2 = raw.to_path_buf();
                let diff =
                    tokio::task::spawn_blocking(move || images::first_difference(&v, &r2, size))
                        .await
                        .map_err(|e| BenchError::Invalid(format!("comparison stopped: {e}")))??;
                if let Some(at) = diff {
                    return Err(BenchError::Invalid(format!(
                        "the materialized VHD differs from the image at byte {at}"
                    )));
                }
                (Some(bytes), Some(true))
            }
            None => (None, None),
        };
        let t = Instant::now();
        let _: serde_json::Value = session
            .operator
            .send_json(
                Method::POST,
                &format!("/v1/vms/{vm}/failover/cleanup"),
                &serde_json::json!({}),
            )
            .await?;
        let cleanup_s = t.elapsed().as_secs_f64();
        let (qemu_convert, qemu_convert_sync) = if args.no_baselines {
            let n = || Outcome::Failed {
                note: "not run (--no-baselines)".into(),
            };
            (n(), n())
        } else {
            eprintln!("bench:   baseline: qemu-img convert -O vpc (fixed)");
            baselines::qemu_img_vpc(raw, &run_dir.join("baseline"), tck).await
        };
        if warm {
            continue;
        }
        runs.push(FailoverRun {
            failover_s,
            materialize_mb_s: size as f64 / failover_s.max(1e-9) / 1e6,
            server_cpu_s,
            disk_bytes: size,
            vhd_bytes,
            vhd_identical,
            cleanup_s,
            qemu_convert,
            qemu_convert_sync,
        });
    }
    Ok((protect_s, runs))
}

pub fn build(
    image: ImageInfo,
    server: String,
    protect_s: f64,
    runs: Vec<FailoverRun>,
) -> FailoverReport {
    let ours: Vec<f64> = runs.iter().map(|r| r.materialize_mb_s).collect();
    let secs: Vec<f64> = runs.iter().map(|r| r.failover_s).collect();
    let synced: Vec<&Outcome> = runs.iter().map(|r| &r.qemu_convert_sync).collect();
    let plain: Vec<&Outcome> = runs.iter().map(|r| &r.qemu_convert).collect();
    let figures = vec![
        Figure::against(
            "test failover MB/s (materialize)",
            &ours,
            &synced,
            "qemu-img convert -O vpc fixed + sync",
            |m| m.mb_s,
        ),
        Figure::against(
            "test failover MB/s (materialize)",
            &ours,
            &plain,
            "qemu-img convert alone, not flushed",
            |m| m.mb_s,
        ),
        Figure::against(
            "test failover s (job)",
            &secs,
            &synced,
            "qemu-img convert + sync, s",
            |m| m.seconds,
        ),
        Figure::new(
            "server CPU s per GB",
            &runs
                .iter()
                .filter_map(|r| r.server_cpu_s.map(|c| c / (r.disk_bytes as f64 / 1e9)))
                .collect::<Vec<_>>(),
            &synced
                .iter()
                .map(|o| o.measured().and_then(|m| m.cpu_s_per_gb))
                .collect::<Vec<_>>(),
            "qemu-img convert + sync CPU s per GB",
        ),
        Figure::alone(
            "cleanup s",
            &runs.iter().map(|r| r.cleanup_s).collect::<Vec<_>>(),
        ),
    ];
    let mut notes = vec![
        "MB = 10^6 bytes of virtual disk; ratios are ours/baseline: above 1 is better for MB/s, below 1 for s".to_string(),
        "ours reads every block from the vault (decrypt, decompress, verify), writes a fixed VHD with zero blocks as holes and fsyncs it; qemu-img reads the plaintext raw image from the page cache".to_string(),
        "server and baseline share this machine; the vault's chunks and the raw image are in the page cache".to_string(),
    ];
    if runs.iter().any(|r| r.vhd_identical == Some(true)) {
        notes.push("every materialized VHD was checked byte for byte against the image".into());
    } else {
        notes.push("the failover output is not on this machine: VHDs were not checked".into());
    }
    FailoverReport {
        tool: "drvault bench failover",
        version: env!("CARGO_PKG_VERSION"),
        image,
        server,
        protect_s,
        figures,
        runs,
        notes,
    }
}

pub fn table(r: &FailoverReport) -> String {
    let heading = vec![
        format!(
            "drvault bench failover: {} image {} ({}, {}), {} round(s)",
            r.image.kind.map(|k| k.as_str()).unwrap_or("given"),
            r.image.path,
            crate::util::human_bytes(r.image.virtual_size),
            r.image.source,
            r.runs.len()
        ),
        format!("  protect (setup): {:.1} s", r.protect_s),
        format!("  server: {}", r.server),
    ];
    report::figures_table(&heading, &r.figures, &r.notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mb_s: f64, q: Outcome) -> FailoverRun {
        FailoverRun {
            failover_s: 2000.0 / mb_s,
            materialize_mb_s: mb_s,
            server_cpu_s: Some(1.0),
            disk_bytes: 2_000_000_000,
            vhd_bytes: Some(1),
            vhd_identical: Some(true),
            cleanup_s: 0.1,
            qemu_convert: q.clone(),
            qemu_convert_sync: q,
        }
    }

    #[test]
    fn ratios_against_qemu_and_missing_peers() {
        let q = |mb_s| {
            Outcome::Ok(baselines::Measured {
                seconds: 2000.0 / mb_s,
                mb_s,
                cpu_s_per_gb: None,
                written_bytes: None,
            })
        };
        let r = build(
            ImageInfo::default(),
            "s".into(),
            1.0,
            vec![
                run(500.0, q(1000.0)),
                run(400.0, q(800.0)),
                run(600.0, q(900.0)),
            ],
        );
        assert_eq!(r.figures[0].ours, Some(500.0));
        assert_eq!(r.figures[0].baseline, Some(900.0));
        assert_eq!(r.figures[0].ratio, Some(500.0 / 900.0));
        assert_eq!(r.figures[2].ours, Some(4.0));
        assert_eq!(r.figures[3].figure, "server CPU s per GB");
        assert_eq!(r.figures[3].ours, Some(0.5));
        assert_eq!(r.figures[3].ratio, None, "no CPU figure for qemu-img here");
        assert!(table(&r).contains("qemu-img convert -O vpc fixed + sync"));

        let missing = Outcome::Missing {
            note: "qemu-img is not installed".into(),
        };
        let r = build(
            ImageInfo::default(),
            "s".into(),
            1.0,
            vec![run(500.0, missing)],
        );
        assert_eq!(r.figures[0].ratio, None);
        assert!(r.figures[0].baseline_what.starts_with("missing"));
        let j: serde_json::Value = serde_json::from_str(&report::json(&r).unwrap()).unwrap();
        assert_eq!(j["runs"][0]["qemu_convert"]["status"], "missing");
    }
}
