//! `drvault bench resync`: how fast and how cheaply a protected disk whose source changed
//! without logs (a broken chain) is brought back in sync, next to `rsync --no-whole-file
//! --inplace` of the same two files in the same run.
//!
//! Each round protects the image as a new VM (the full initial replication, timed: what a resync
//! saves), changes a raw copy of the image in place ([`changes::write_in_place`]: scattered 4 KiB
//! writes, 256 KiB extents or both, with the image's own data), starts a resync at once
//! (`POST /v1/vms/{vm}/resync {"now": true}`) and runs the reference agent's resync
//! ([`crate::agent::resync::resync`]) over the changed copy until the session commits. The server
//! checks the whole-disk digest before it switches, so a wrong result cannot pass as fast.
//!
//! Decisions the brief left open:
//! * rsync is the peer for "send only what changed": `rsync --no-whole-file --inplace --stats
//!   CHANGED DEST` where DEST is a copy of the original image, then `sync DEST`. rsync between
//!   two local paths still runs its delta algorithm over a pipe between two processes when
//!   --no-whole-file is given; its "Total bytes sent" is the peer of our patch bytes.
//! * Our time runs from the resync request to the agent's summary (session committed): block
//!   hashes read on both sides, 4 KiB hashes of differing blocks, patches, the switch.
//! * Both files and the vault are in the page cache: this measures CPU and protocol, not disks.

use std::path::Path;
use std::time::Instant;

use reqwest::Method;
use serde::Serialize;

use super::baselines::{self, Outcome};
use super::changes::{self, DonorPages, Pattern};
use super::images;
use super::procstat::clock_ticks_per_second;
use super::report::{self, Figure, ImageInfo};
use super::server::{
    per_changed_byte, quick_backoff, run_tag, server_counter, RunClients, Target, TargetArgs, DISK,
    IN_PLACE, VAULT_WRITTEN,
};
use super::{io_err, BenchError};
use crate::agent::resync::{resync, ResyncOptions};
use crate::format::image::ImageFormat;

/// Change patterns on the command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum ChangeArg {
    Scattered,
    Extents,
    Mixed,
}

impl From<ChangeArg> for Pattern {
    fn from(c: ChangeArg) -> Pattern {
        match c {
            ChangeArg::Scattered => Pattern::Scattered,
            ChangeArg::Extents => Pattern::Extents,
            ChangeArg::Mixed => Pattern::Mixed,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ResyncArgs {
    #[command(flatten)]
    pub image: images::ImageArgs,
    /// Bytes the source changes between the replica and the resync (written with the image's
    /// own data).
    #[arg(long, default_value = "64MiB", value_parser = super::parse_size_arg)]
    pub change: u64,
    /// How the changes are laid out.
    #[arg(long, value_enum, default_value_t = ChangeArg::Scattered)]
    pub pattern: ChangeArg,
    /// Measured rounds (protect, change, resync, rsync); figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Skip the rsync baseline.
    #[arg(long)]
    pub no_baselines: bool,
    /// Print one JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// rsync's side of one round.
#[derive(Debug, Clone, Serialize)]
pub struct RsyncRun {
    pub outcome: Outcome,
    /// "Total bytes sent" from `--stats`.
    pub bytes_sent: Option<u64>,
}

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncRun {
    /// The initial replication of the image (what a resync avoids).
    pub protect_s: f64,
    /// Bytes the change wrote into the source.
    pub changed_bytes: u64,
    /// From the resync request to the session's commit.
    pub resync_s: f64,
    pub blocks_compared: u64,
    pub blocks_differing: u64,
    pub bytes_uploaded: u64,
    pub hash_bytes_downloaded: u64,
    pub disk_bytes: u64,
    /// Bytes the resync (request to commit) wrote into the vault per changed byte (`None`: the
    /// server keeps no store byte count).
    pub vault_per_changed_byte: Option<f64>,
    pub rsync: RsyncRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResyncReport {
    pub tool: &'static str,
    pub version: &'static str,
    pub image: ImageInfo,
    pub server: String,
    pub pattern: Pattern,
    pub figures: Vec<Figure>,
    pub runs: Vec<ResyncRun>,
    pub notes: Vec<String>,
}

pub async fn run(args: ResyncArgs) -> Result<i32, BenchError> {
    if args.runs == 0 {
        return Err(BenchError::Invalid("--runs must be at least 1".into()));
    }
    if args.change == 0 {
        return Err(BenchError::Invalid("--change must be more than 0".into()));
    }
    let target = Target::from_args(&args.target)?;
    let load_at_start = super::load_average();
    let p = images::prepare(&args.image).await?;
    let run_dir = p.work.join("runs").join("resync");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(io_err("creating", &run_dir))?;
    // The changed source and rsync's destination are raw files.
    let original = run_dir.join("original.raw");
    if p.image.format() == ImageFormat::Raw {
        std::fs::copy(&p.path, &original).map_err(io_err("copying", &p.path))?;
    } else {
        let (img, o2) = (p.image.clone(), original.clone());
        tokio::task::spawn_blocking(move || images::write_raw(img.as_ref(), &o2))
            .await
            .map_err(|e| BenchError::Invalid(format!("raw copy stopped: {e}")))??;
    }
    eprintln!("bench: sampling the image's data pages for the changes' contents");
    let img = p.image.clone();
    let donor =
        tokio::task::spawn_blocking(move || DonorPages::sample(img.as_ref(), 16384, 0x7265))
            .await
            .map_err(|e| BenchError::Invalid(format!("sampling stopped: {e}")))??;
    let session = target.session(&run_dir).await?;
    let result = measure(&session, &args, &p, &original, &donor, &run_dir).await;
    let stopped = session.finish().await;
    let _ = std::fs::remove_dir_all(&run_dir);
    let runs = result?;
    stopped?;
    let mut r = build(p.info, target.describe(), args.pattern.into(), runs);
    r.notes.push(super::load_note(&load_at_start));
    if args.json {
        println!("{}", report::json(&r)?);
    } else {
        print!("{}", table(&r));
    }
    Ok(0)
}

async fn measure(
    session: &RunClients,
    args: &ResyncArgs,
    p: &images::Prepared,
    original: &Path,
    donor: &DonorPages,
    run_dir: &Path,
) -> Result<Vec<ResyncRun>, BenchError> {
    let size = p.image.virtual_size();
    let changed = run_dir.join("changed.raw");
    let dest = run_dir.join("rsync-dest.raw");
    let tck = clock_ticks_per_second();
    let mut runs = Vec::new();
    for k in 0..args.runs {
        let vm = format!("bench-resync-{}", run_tag());
        eprintln!("bench: round {}/{}: protecting {vm}", k + 1, args.runs);
        let t = Instant::now();
        session.protect(&vm, original, p.image.clone()).await?;
        let protect_s = t.elapsed().as_secs_f64();

        std::fs::copy(original, &changed).map_err(io_err("copying", original))?;
        let changed_bytes = changes::write_in_place(
            &changed,
            args.pattern.into(),
            args.change,
            size,
            donor,
            0x5eed + k as u64,
        )?;
        images::warm_page_cache(&changed)?;

        eprintln!("bench:   resync of {vm}");
        let written0 = server_counter(&session.operator, VAULT_WRITTEN).await?;
        let t = Instant::now();
        let _: serde_json::Value = session
            .operator
            .send_json(
                Method::POST,
                &format!("/v1/vms/{vm}/resync"),
                &serde_json::json!({ "now": true }),
            )
            .await?;
        let opts = ResyncOptions {
            vm: vm.clone(),
            disk: DISK.into(),
            parallel: 4,
            backoff: quick_backoff(),
            progress: false,
            format: Default::default(),
        };
        let s = resync(&session.agent, &changed, &opts)
            .await
            .map_err(|e| BenchError::Agent {
                vm: vm.clone(),
                source: Box::new(e),
            })?;
        let resync_s = t.elapsed().as_secs_f64();
        let vault_per_changed_byte = per_changed_byte(
            written0,
            server_counter(&session.operator, VAULT_WRITTEN).await?,
            changed_bytes,
        );
        if s.state != "committed" {
            return Err(BenchError::Server(format!(
                "the resync of {vm} ended {} (waiting for {:?})",
                s.state, s.waiting_for
            )));
        }

        let rsync = if args.no_baselines {
            RsyncRun {
                outcome: Outcome::Failed {
                    note: "not run (--no-baselines)".into(),
                },
                bytes_sent: None,
            }
        } else {
            eprintln!("bench:   baseline: rsync --no-whole-file --inplace");
            std::fs::copy(original, &dest).map_err(io_err("copying", original))?;
            let (outcome, bytes_sent) = baselines::rsync(&changed, &dest, size, tck).await;
            if outcome.measured().is_some() {
                if let Some(at) = images::first_difference(&changed, &dest, size)? {
                    return Err(BenchError::Invalid(format!(
                        "rsync's copy differs from the source at byte {at}"
                    )));
                }
            }
            RsyncRun {
                outcome,
                bytes_sent,
            }
        };
        runs.push(ResyncRun {
            protect_s,
            changed_bytes,
            resync_s,
            blocks_compared: s.blocks_compared,
            blocks_differing: s.blocks_differing,
            bytes_uploaded: s.bytes_uploaded,
            hash_bytes_downloaded: s.hash_bytes_downloaded,
            disk_bytes: size,
            vault_per_changed_byte,
            rsync,
        });
    }
    let _ = std::fs::remove_file(&changed);
    let _ = std::fs::remove_file(&dest);
    Ok(runs)
}

pub fn build(
    image: ImageInfo,
    server: String,
    pattern: Pattern,
    runs: Vec<ResyncRun>,
) -> ResyncReport {
    let secs: Vec<f64> = runs.iter().map(|r| r.resync_s).collect();
    let rs: Vec<&Outcome> = runs.iter().map(|r| &r.rsync.outcome).collect();
    let sent: Vec<f64> = runs
        .iter()
        .map(|r| (r.bytes_uploaded + r.hash_bytes_downloaded) as f64)
        .collect();
    let rsync_sent: Vec<Option<f64>> = runs
        .iter()
        .map(|r| r.rsync.bytes_sent.map(|b| b as f64))
        .collect();
    let mut rsync_what = "rsync --no-whole-file --inplace: total bytes sent".to_string();
    if rsync_sent.iter().all(|x| x.is_none()) {
        if let Some(Outcome::Missing { note } | Outcome::Failed { note }) =
            rs.iter().find(|o| o.measured().is_none())
        {
            rsync_what = format!("missing: {note}");
        }
    }
    let mut figures = vec![
        Figure::against(
            "resync s (request to commit)",
            &secs,
            &rs,
            "rsync --no-whole-file --inplace + sync, s",
            |m| m.seconds,
        ),
        Figure::against(
            "resync MB/s of disk compared",
            &runs
                .iter()
                .map(|r| r.disk_bytes as f64 / r.resync_s.max(1e-9) / 1e6)
                .collect::<Vec<_>>(),
            &rs,
            "rsync MB/s",
            |m| m.mb_s,
        ),
        Figure::new(
            "bytes on the wire (patches + hashes)",
            &sent,
            &rsync_sent,
            &rsync_what,
        ),
        Figure::new(
            "patch bytes per changed byte",
            &runs
                .iter()
                .map(|r| r.bytes_uploaded as f64 / r.changed_bytes.max(1) as f64)
                .collect::<Vec<_>>(),
            &[],
            "",
        ),
        Figure::new(
            "resync s",
            &secs,
            &runs.iter().map(|r| Some(r.protect_s)).collect::<Vec<_>>(),
            "initial replication of the same disk, s",
        ),
    ];
    let vault: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.vault_per_changed_byte)
        .collect();
    figures.push(Figure::new(
        "vault bytes per changed byte, resync",
        &vault,
        &vec![Some(1.0); vault.len()],
        IN_PLACE,
    ));
    let notes = vec![
        "ratios are ours/baseline: below 1 is better for s and bytes, above 1 for MB/s".to_string(),
        "ours: block hashes on both sides, 4 KiB hashes of differing blocks, patches of differing pieces, digest check and switch to a new recovery point, over HTTPS".to_string(),
        "rsync: delta transfer between two local files (two processes and a pipe), then sync; its copy is checked byte for byte".to_string(),
        "the server checks the whole disk's digest before it commits a resync".to_string(),
        "vault bytes per changed byte: the server's drvault_store_bytes_written_total from the resync request to its commit (chunks, receipts, maps, records), over the bytes the change wrote".to_string(),
    ];
    ResyncReport {
        tool: "drvault bench resync",
        version: env!("CARGO_PKG_VERSION"),
        image,
        server,
        pattern,
        figures,
        runs,
        notes,
    }
}

pub fn table(r: &ResyncReport) -> String {
    let changed = r.runs.first().map(|x| x.changed_bytes).unwrap_or(0);
    let heading = vec![
        format!(
            "drvault bench resync: {} image {} ({}, {}), {} round(s)",
            r.image.kind.map(|k| k.as_str()).unwrap_or("given"),
            r.image.path,
            crate::util::human_bytes(r.image.virtual_size),
            r.image.source,
            r.runs.len()
        ),
        format!(
            "  change: {} of {}",
            crate::util::human_bytes(changed),
            r.pattern.describe()
        ),
        format!("  server: {}", r.server),
    ];
    report::figures_table(&heading, &r.figures, &r.notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(resync_s: f64, rsync: Option<(f64, u64)>) -> ResyncRun {
        ResyncRun {
            protect_s: 10.0,
            changed_bytes: 1_000_000,
            resync_s,
            blocks_compared: 100,
            blocks_differing: 50,
            bytes_uploaded: 1_100_000,
            hash_bytes_downloaded: 100_000,
            disk_bytes: 1_000_000_000,
            vault_per_changed_byte: Some(resync_s),
            rsync: match rsync {
                Some((s, b)) => RsyncRun {
                    outcome: Outcome::Ok(baselines::Measured {
                        seconds: s,
                        mb_s: 1000.0 / s,
                        cpu_s_per_gb: None,
                        written_bytes: None,
                    }),
                    bytes_sent: Some(b),
                },
                None => RsyncRun {
                    outcome: Outcome::Missing {
                        note: "rsync is not installed".into(),
                    },
                    bytes_sent: None,
                },
            },
        }
    }

    #[test]
    fn figures_are_medians_against_rsync_and_a_missing_rsync_is_named() {
        let r = build(
            ImageInfo::default(),
            "s".into(),
            Pattern::Scattered,
            vec![
                run(2.0, Some((4.0, 2_400_000))),
                run(1.0, Some((5.0, 2_400_000))),
                run(3.0, Some((3.0, 2_400_000))),
            ],
        );
        assert_eq!(r.figures[0].ours, Some(2.0));
        assert_eq!(r.figures[0].baseline, Some(4.0));
        assert_eq!(r.figures[0].ratio, Some(0.5));
        assert_eq!(r.figures[2].ours, Some(1_200_000.0));
        assert_eq!(r.figures[2].ratio, Some(0.5));
        assert_eq!(r.figures[3].ours, Some(1.1));
        assert_eq!(r.figures[4].baseline, Some(10.0));
        assert_eq!(r.figures[5].figure, "vault bytes per changed byte, resync");
        assert_eq!(
            (r.figures[5].ours, r.figures[5].ratio),
            (Some(2.0), Some(2.0))
        );
        assert!(table(&r).contains("scattered 4 KiB writes"));

        let r = build(
            ImageInfo::default(),
            "s".into(),
            Pattern::Extents,
            vec![run(2.0, None)],
        );
        assert_eq!(r.figures[0].ratio, None);
        assert!(r.figures[0].baseline_what.starts_with("missing"));
        assert!(r.figures[2].baseline_what.starts_with("missing"));
    }
}
