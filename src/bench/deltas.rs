//! `drvault bench deltas`: delta replication with real MS-HRL logs against a server.
//!
//! Each run protects the image as a new VM (one disk), then:
//!
//! 1. for each of two logs of the same size, one of scattered 4 KiB writes and one of 256 KiB
//!    extents (the order alternates between runs, so neither always meets a warmer vault):
//!    send it as the agent does (`agent replicate`) and time the acknowledgement; poll
//!    `GET /v1/vms/{vm}/points` until its point is listed; merge it (`POST …/merge
//!    {"all":true}`, which answers when done); apply the same log to a raw copy of the image
//!    with `hrl apply`'s code and fsync (the merge baseline, and the reference the exports are
//!    checked against); the in-process pipeline and `cp` + fsync of the log file (the
//!    acknowledgement baselines);
//! 2. send a journal of N smaller logs (each half 4 KiB writes, half 256 KiB extents), export
//!    the disk at the newest point through the API (`drvault export`'s code) while all N logs
//!    are unmerged, merge them, export the same point again from the merged base; both exports
//!    must equal the raw reference byte for byte, else the run fails (a fast wrong answer is
//!    not a figure).
//!
//! Decisions the brief left open:
//! * "Time to recovery point" is from the acknowledgement's arrival to the first points
//!   listing that holds the log's cycle; its floor is one `GET /points` round trip, measured
//!   in the same run as the baseline. The acknowledgement is sent after the journal entry is
//!   committed, so the figure says whether anything lags behind the commit.
//! * Merge MB/s counts log bytes merged per second of the merge request. A merge rewrites every
//!   4 MiB block a log touches, so 256 MiB of scattered writes over a 2 GiB disk rewrite it all.
//! * Logs are written before their timing starts and are in the page cache, as the image is.
//! * Sizes are capped at a quarter of the disk: pending log bytes at half the disk mark it
//!   resync-required, which would end the run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Serialize;

use super::baselines::{self, Outcome};
use super::changes::{self, DonorPages, LogFile, LogSpec, Pattern, EXTENT, PAGE};
use super::images;
use super::procstat::clock_ticks_per_second;
use super::report::{self, Figure, ImageInfo};
use super::server::{
    per_changed_byte, quick_backoff, run_tag, server_counter, RunClients, Target, TargetArgs, DISK,
    IN_PLACE, VAULT_WRITTEN,
};
use super::{io_err, median, parse_size_arg, BenchError};
use crate::agent::replicate::{replicate, ReplicateOptions};
use crate::format::hrl::Guid;
use crate::format::image::DiskImage;
use crate::ingest::logs::LogAck;
use crate::replica::points::MergeReport;

#[derive(clap::Args, Debug, Clone)]
pub struct DeltasArgs {
    #[command(flatten)]
    pub image: images::ImageArgs,
    /// Disk bytes written by each of the two pattern logs (scattered 4 KiB writes, 256 KiB
    /// extents); a multiple of 256 KiB, at most a quarter of the disk.
    #[arg(long, default_value = "256MiB", value_parser = parse_size_arg)]
    pub log_size: u64,
    /// Logs in the long journal exported before and after merging.
    #[arg(long, default_value_t = 50)]
    pub journal_logs: usize,
    /// Disk bytes written by the whole long journal (at most a quarter of the disk).
    #[arg(long, default_value = "256MiB", value_parser = parse_size_arg)]
    pub journal_size: u64,
    /// Measured runs; figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Skip the pipeline and cp baselines (the `hrl apply` baseline is the export check's
    /// reference and always runs).
    #[arg(long)]
    pub no_baselines: bool,
    /// Print one JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One pattern log in one run.
#[derive(Debug, Clone, Serialize)]
pub struct PatternRun {
    pub log: LogFile,
    pub ack_s: f64,
    /// Log bytes acknowledged per second.
    pub ack_mb_s: f64,
    pub visible_ms: f64,
    pub merge_s: f64,
    pub merge_mb_s: f64,
    pub blocks_rewritten: u64,
    /// Bytes the merge wrote into the vault per byte the log writes (`None`: the server keeps
    /// no store byte count).
    pub merge_vault_per_changed_byte: Option<f64>,
    /// `hrl apply` of the log to a raw copy of the disk, with fsync.
    pub apply: Outcome,
    pub pipeline: Outcome,
    pub cp: Outcome,
}

/// The long journal in one run.
#[derive(Debug, Clone, Serialize)]
pub struct JournalRun {
    pub logs: usize,
    pub log_bytes: u64,
    pub data_bytes: u64,
    pub ack_s: f64,
    pub export_journal_s: f64,
    pub merge_s: f64,
    pub merge_mb_s: f64,
    pub blocks_rewritten: u64,
    /// As [`PatternRun::merge_vault_per_changed_byte`], for the whole journal's merge.
    pub merge_vault_per_changed_byte: Option<f64>,
    pub export_merged_s: f64,
    pub apply: Outcome,
    /// `cp` + fsync of the raw disk: the export baseline.
    pub cp_disk: Outcome,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeltaRun {
    pub vm: String,
    pub protect_s: f64,
    /// Median of five `GET /points` round trips before the first log.
    pub points_rtt_ms: f64,
    /// Which pattern went first in this run.
    pub first: Pattern,
    pub scattered: PatternRun,
    pub extents: PatternRun,
    pub journal: JournalRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeltasReport {
    pub tool: &'static str,
    pub version: &'static str,
    pub image: ImageInfo,
    pub server: String,
    pub log_size: u64,
    pub journal_logs: usize,
    pub journal_size: u64,
    pub figures: Vec<Figure>,
    pub runs: Vec<DeltaRun>,
    pub notes: Vec<String>,
}

struct Ctx {
    work: PathBuf,
    image_path: PathBuf,
    image: Arc<dyn DiskImage>,
    donor: Arc<DonorPages>,
    target: Target,
    tck: u64,
    args: DeltasArgs,
}

/// Donor sample size: 64 MiB of the image's data pages.
const DONOR_PAGES: usize = 16384;

pub async fn run(args: DeltasArgs) -> Result<i32, BenchError> {
    let target = Target::from_args(&args.target)?;
    let load_at_start = super::load_average();
    let p = images::prepare(&args.image).await?;
    validate(&args, p.image.virtual_size())?;
    images::warm_page_cache(&p.path)?;
    eprintln!("bench: sampling the image's data pages for the logs' contents");
    let img = p.image.clone();
    let donor = tokio::task::spawn_blocking(move || {
        DonorPages::sample(img.as_ref(), DONOR_PAGES, 0x6465_6c74_6173)
    })
    .await
    .map_err(|e| BenchError::Invalid(format!("sampling stopped: {e}")))??;
    let ctx = Ctx {
        work: p.work,
        image_path: p.path,
        image: p.image,
        donor: Arc::new(donor),
        target,
        tck: clock_ticks_per_second(),
        args: args.clone(),
    };
    let mut runs = Vec::new();
    for k in 0..args.runs {
        eprintln!("bench: deltas run {}/{}", k + 1, args.runs);
        runs.push(run_once(&ctx, k).await?);
    }
    let mut r = build(p.info, ctx.target.describe(), &args, runs);
    r.notes.push(super::load_note(&load_at_start));
    if args.json {
        println!("{}", report::json(&r)?);
    } else {
        print!("{}", table(&r));
    }
    Ok(0)
}

pub fn validate(a: &DeltasArgs, disk: u64) -> Result<(), BenchError> {
    let bad = |m: String| Err(BenchError::Invalid(m));
    if a.runs == 0 {
        return bad("--runs must be at least 1".into());
    }
    if a.log_size % EXTENT != 0 {
        return bad(format!(
            "--log-size {}: must be a multiple of 256 KiB so both patterns write the same bytes",
            a.log_size
        ));
    }
    for (name, v) in [
        ("--log-size", a.log_size),
        ("--journal-size", a.journal_size),
    ] {
        if v > disk / 4 {
            return bad(format!("{name} {v}: at most a quarter of the {disk}-byte disk (pending logs at half the disk make it resync-required)"));
        }
    }
    if a.journal_logs == 0 || a.journal_logs > 10_000 {
        return bad(format!(
            "--journal-logs {}: must be 1-10000",
            a.journal_logs
        ));
    }
    if a.journal_size / (a.journal_logs as u64) < PAGE {
        return bad(format!(
            "--journal-size {} over {} logs leaves less than 4 KiB per log",
            a.journal_size, a.journal_logs
        ));
    }
    Ok(())
}

async fn run_once(ctx: &Ctx, k: usize) -> Result<DeltaRun, BenchError> {
    let run_dir = ctx.work.join("runs").join(format!("deltas-{k}"));
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(io_err("creating", &run_dir))?;
    let session = ctx.target.session(&run_dir).await?;
    let result = measure(ctx, &session, &run_dir, k).await;
    let stopped = session.finish().await;
    let _ = std::fs::remove_dir_all(&run_dir);
    let r = result?;
    stopped?;
    Ok(r)
}

/// What every step of one run needs.
struct RunState<'a> {
    ctx: &'a Ctx,
    session: &'a RunClients,
    dir: &'a Path,
    vm: String,
    /// The raw reference: the image with every log sent so far applied.
    expected: PathBuf,
    data_write: Guid,
    previous: Guid,
    seed: u64,
}

async fn measure(
    ctx: &Ctx,
    session: &RunClients,
    dir: &Path,
    k: usize,
) -> Result<DeltaRun, BenchError> {
    let vm = format!("bench-deltas-{}", run_tag());
    eprintln!("bench:   protecting {vm}");
    let t = Instant::now();
    session
        .protect(&vm, &ctx.image_path, ctx.image.clone())
        .await?;
    let protect_s = t.elapsed().as_secs_f64();
    let expected = dir.join("expected.img");
    let img = ctx.image.clone();
    let e2 = expected.clone();
    tokio::task::spawn_blocking(move || images::write_raw(img.as_ref(), &e2))
        .await
        .map_err(|e| BenchError::Invalid(format!("raw copy stopped: {e}")))??;
    let mut rtts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let _: Vec<serde_json::Value> = session
            .operator
            .get_json(&format!("/v1/vms/{vm}/points"))
            .await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut st = RunState {
        ctx,
        session,
        dir,
        vm: vm.clone(),
        expected,
        data_write: Guid::new_random(),
        previous: Guid::NIL,
        seed: 1000 * k as u64,
    };
    let first = if k % 2 == 0 {
        Pattern::Scattered
    } else {
        Pattern::Extents
    };
    let second = if first == Pattern::Scattered {
        Pattern::Extents
    } else {
        Pattern::Scattered
    };
    let a = pattern_run(&mut st, first).await?;
    let b = pattern_run(&mut st, second).await?;
    let (scattered, extents) = if first == Pattern::Scattered {
        (a, b)
    } else {
        (b, a)
    };
    let journal = journal_run(&mut st).await?;
    Ok(DeltaRun {
        vm,
        protect_s,
        points_rtt_ms: median(&rtts).unwrap_or(0.0),
        first,
        scattered,
        extents,
        journal,
    })
}

impl RunState<'_> {
    /// Writes the next log of the chain.
    async fn next_log(
        &mut self,
        pattern: Pattern,
        bytes: u64,
        name: &str,
    ) -> Result<LogFile, BenchError> {
        let path = self.dir.join(format!("{name}.hrl"));
        let unique = Guid::new_random();
        self.seed += 1;
        let (donor, disk_size) = (self.ctx.donor.clone(), self.ctx.image.virtual_size());
        let (previous, data_write, seed) = (self.previous, self.data_write, self.seed);
        let lf = tokio::task::spawn_blocking(move || {
            let spec = LogSpec {
                pattern,
                bytes,
                disk_size,
                previous,
                unique,
                data_write,
                donor: &donor,
            };
            changes::write_log(&path, &spec, seed)
        })
        .await
        .map_err(|e| BenchError::Invalid(format!("log writer stopped: {e}")))??;
        self.previous = unique;
        Ok(lf)
    }

    /// Sends a log as the agent does; returns the acknowledgement and its time.
    async fn send(&self, log: &LogFile) -> Result<(LogAck, f64), BenchError> {
        let opts = ReplicateOptions {
            vm: self.vm.clone(),
            disk: DISK.into(),
            cycle: None,
            app_consistent: false,
            final_log: false,
            backoff: quick_backoff(),
        };
        let t = Instant::now();
        let ack = replicate(&self.session.agent, &log.path, &opts)
            .await
            .map_err(|e| BenchError::Agent {
                vm: self.vm.clone(),
                source: Box::new(e),
            })?;
        let secs = t.elapsed().as_secs_f64();
        if ack.status != "accepted" || ack.resync_required.is_some() {
            return Err(BenchError::Server(format!(
                "log {} was answered {} (resync: {:?}): the run is not measuring what it should",
                log.unique_id, ack.status, ack.resync_required
            )));
        }
        Ok((ack, secs))
    }

    /// The server's [`VAULT_WRITTEN`] count.
    async fn vault_written(&self) -> Result<Option<f64>, BenchError> {
        server_counter(&self.session.operator, VAULT_WRITTEN).await
    }

    /// Merges every log of the VM; returns the report and the request's time.
    async fn merge(&self) -> Result<(MergeReport, f64), BenchError> {
        let t = Instant::now();
        let r: MergeReport = self
            .session
            .operator
            .send_json(
                Method::POST,
                &format!("/v1/vms/{}/merge", self.vm),
                &serde_json::json!({ "all": true }),
            )
            .await?;
        Ok((r, t.elapsed().as_secs_f64()))
    }

    /// Applies a log to the raw reference as `drvault hrl apply` does (validate, write,
    /// fsync); returns its time.
    async fn apply(&self, log: &Path) -> Result<f64, BenchError> {
        let (log, raw) = (log.to_path_buf(), self.expected.clone());
        let t = Instant::now();
        tokio::task::spawn_blocking(move || crate::format::hrl::apply_to_raw(&log, &raw))
            .await
            .map_err(|e| BenchError::Invalid(format!("hrl apply stopped: {e}")))?
            .map_err(|e| BenchError::Tool {
                tool: "hrl apply".into(),
                message: format!("{e:#}"),
            })?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Exports the disk at the newest point as a fixed VHD, checks it against the reference,
    /// removes it; returns the export's time.
    async fn export_checked(&self, name: &str) -> Result<f64, BenchError> {
        let out = self.dir.join(format!("{name}.vhd"));
        let t = Instant::now();
        crate::client::export::export(
            &self.session.operator,
            &self.vm,
            DISK,
            Some("latest"),
            true,
            &out,
            4,
            false,
        )
        .await
        .map_err(|e| BenchError::Tool {
            tool: "export".into(),
            message: format!("{e:#}"),
        })?;
        let secs = t.elapsed().as_secs_f64();
        let (o2, e2, size) = (
            out.clone(),
            self.expected.clone(),
            self.ctx.image.virtual_size(),
        );
        let diff = tokio::task::spawn_blocking(move || images::first_difference(&o2, &e2, size))
            .await
            .map_err(|e| BenchError::Invalid(format!("comparison stopped: {e}")))??;
        let _ = std::fs::remove_file(&out);
        if let Some(at) = diff {
            return Err(BenchError::Invalid(format!(
                "the {name} export differs from the disk with the logs applied at byte {at}"
            )));
        }
        Ok(secs)
    }
}

async fn pattern_run(st: &mut RunState<'_>, pattern: Pattern) -> Result<PatternRun, BenchError> {
    let name = match pattern {
        Pattern::Scattered => "scattered",
        Pattern::Extents => "extents",
        Pattern::Mixed => "mixed",
    };
    eprintln!("bench:   {name} log ({})", pattern.describe());
    let log = st.next_log(pattern, st.ctx.args.log_size, name).await?;
    let (ack, ack_s) = st.send(&log).await?;
    // Time to the point: from the acknowledgement to the first listing that holds it.
    let t = Instant::now();
    loop {
        let points: Vec<serde_json::Value> = st
            .session
            .operator
            .get_json(&format!("/v1/vms/{}/points", st.vm))
            .await?;
        if points
            .iter()
            .any(|p| p["cycle"].as_u64() == Some(ack.cycle))
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(BenchError::Server(format!(
                "point c{} not listed 60 s after its log was acknowledged",
                ack.cycle
            )));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let visible_ms = t.elapsed().as_secs_f64() * 1e3;
    let written0 = st.vault_written().await?;
    let (merged, merge_s) = st.merge().await?;
    let merge_vault_per_changed_byte =
        per_changed_byte(written0, st.vault_written().await?, log.data_bytes);
    let apply = Outcome::Ok(mb_s(log.log_bytes, st.apply(&log.path).await?));
    let (pipeline, cp) = if st.ctx.args.no_baselines {
        let n = || Outcome::Failed {
            note: "not run (--no-baselines)".into(),
        };
        (n(), n())
    } else {
        let bdir = st.dir.join("baselines");
        let img: Arc<dyn DiskImage> = Arc::from(crate::format::image::open(&log.path)?);
        let p = match baselines::pipeline(img, &bdir.join("pipeline"), st.ctx.tck).await {
            Ok(m) => Outcome::Ok(m),
            Err(e) => Outcome::Failed {
                note: e.to_string(),
            },
        };
        let c = baselines::cp(&log.path, &bdir, st.ctx.tck).await;
        let _ = std::fs::remove_dir_all(&bdir);
        (p, c)
    };
    let _ = std::fs::remove_file(&log.path);
    Ok(PatternRun {
        ack_mb_s: log.log_bytes as f64 / ack_s.max(1e-9) / 1e6,
        ack_s,
        visible_ms,
        merge_mb_s: log.log_bytes as f64 / merge_s.max(1e-9) / 1e6,
        merge_s,
        blocks_rewritten: merged.blocks_rewritten,
        merge_vault_per_changed_byte,
        log,
        apply,
        pipeline,
        cp,
    })
}

fn mb_s(bytes: u64, secs: f64) -> baselines::Measured {
    baselines::Measured {
        seconds: secs,
        mb_s: bytes as f64 / secs.max(1e-9) / 1e6,
        cpu_s_per_gb: None,
        written_bytes: None,
    }
}

async fn journal_run(st: &mut RunState<'_>) -> Result<JournalRun, BenchError> {
    let n = st.ctx.args.journal_logs;
    let per_log = st.ctx.args.journal_size / n as u64;
    eprintln!(
        "bench:   journal of {n} logs of {} each",
        crate::util::human_bytes(per_log)
    );
    let (mut ack_s, mut apply_s, mut log_bytes, mut data_bytes) = (0.0, 0.0, 0u64, 0u64);
    for j in 0..n {
        let log = st
            .next_log(Pattern::Mixed, per_log, &format!("journal-{j}"))
            .await?;
        ack_s += st.send(&log).await?.1;
        apply_s += st.apply(&log.path).await?;
        log_bytes += log.log_bytes;
        data_bytes += log.data_bytes;
        let _ = std::fs::remove_file(&log.path);
    }
    eprintln!("bench:   export with {n} unmerged logs, merge, export again");
    let export_journal_s = st.export_checked("export-journal").await?;
    let written0 = st.vault_written().await?;
    let (merged, merge_s) = st.merge().await?;
    let merge_vault_per_changed_byte =
        per_changed_byte(written0, st.vault_written().await?, data_bytes);
    if merged.logs_merged != n {
        return Err(BenchError::Server(format!(
            "merge folded {} logs, expected {n}",
            merged.logs_merged
        )));
    }
    let export_merged_s = st.export_checked("export-merged").await?;
    let cp_disk = if st.ctx.args.no_baselines {
        Outcome::Failed {
            note: "not run (--no-baselines)".into(),
        }
    } else {
        let bdir = st.dir.join("baselines");
        let c = baselines::cp(&st.expected, &bdir, st.ctx.tck).await;
        let _ = std::fs::remove_dir_all(&bdir);
        c
    };
    Ok(JournalRun {
        logs: n,
        log_bytes,
        data_bytes,
        ack_s,
        export_journal_s,
        merge_mb_s: log_bytes as f64 / merge_s.max(1e-9) / 1e6,
        merge_s,
        blocks_rewritten: merged.blocks_rewritten,
        merge_vault_per_changed_byte,
        export_merged_s,
        apply: Outcome::Ok(mb_s(log_bytes, apply_s)),
        cp_disk,
    })
}

/// The figures: medians over runs, each next to its same-run baseline.
pub fn build(
    image: ImageInfo,
    server: String,
    a: &DeltasArgs,
    runs: Vec<DeltaRun>,
) -> DeltasReport {
    let col = |f: &dyn Fn(&DeltaRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let outs = |f: &dyn Fn(&DeltaRun) -> &Outcome| runs.iter().map(f).collect::<Vec<&Outcome>>();
    let rate = |m: &baselines::Measured| m.mb_s;
    let secs = |m: &baselines::Measured| m.seconds;
    let n = a.journal_logs;
    let mut figures = vec![];
    for (label, pick) in [
        (
            "scattered 4 KiB",
            (|r: &DeltaRun| &r.scattered) as fn(&DeltaRun) -> &PatternRun,
        ),
        ("256 KiB extents", |r: &DeltaRun| &r.extents),
    ] {
        figures.push(Figure::against(
            &format!("ack MB/s, {label}"),
            &col(&|r| pick(r).ack_mb_s),
            &outs(&|r| &pick(r).pipeline),
            "in-process pipeline on the log",
            rate,
        ));
        figures.push(Figure::against(
            &format!("ack MB/s, {label}"),
            &col(&|r| pick(r).ack_mb_s),
            &outs(&|r| &pick(r).cp),
            "cp + fsync of the log",
            rate,
        ));
    }
    figures.push(Figure::new(
        "ack s, scattered vs extents",
        &col(&|r| r.scattered.ack_s),
        &runs
            .iter()
            .map(|r| Some(r.extents.ack_s))
            .collect::<Vec<_>>(),
        "ack s of the extents log (bar: ratio <= 2)",
    ));
    for (label, pick) in [
        (
            "scattered",
            (|r: &DeltaRun| &r.scattered) as fn(&DeltaRun) -> &PatternRun,
        ),
        ("extents", |r: &DeltaRun| &r.extents),
    ] {
        figures.push(Figure::new(
            &format!("ack -> point listed ms, {label}"),
            &col(&|r| pick(r).visible_ms),
            &runs
                .iter()
                .map(|r| Some(r.points_rtt_ms))
                .collect::<Vec<_>>(),
            "one GET /points round trip",
        ));
    }
    for (label, pick) in [
        (
            "scattered",
            (|r: &DeltaRun| &r.scattered) as fn(&DeltaRun) -> &PatternRun,
        ),
        ("extents", |r: &DeltaRun| &r.extents),
    ] {
        figures.push(Figure::against(
            &format!("merge MB/s of log, {label}"),
            &col(&|r| pick(r).merge_mb_s),
            &outs(&|r| &pick(r).apply),
            "hrl apply to a raw disk + fsync",
            rate,
        ));
    }
    figures.push(Figure::against(
        &format!("merge MB/s of log, {n}-log journal"),
        &col(&|r| r.journal.merge_mb_s),
        &outs(&|r| &r.journal.apply),
        "hrl apply to a raw disk + fsync",
        rate,
    ));
    figures.push(Figure::new(
        &format!("export s, point behind {n} logs"),
        &col(&|r| r.journal.export_journal_s),
        &runs
            .iter()
            .map(|r| Some(r.journal.export_merged_s))
            .collect::<Vec<_>>(),
        "export s of the same point merged",
    ));
    figures.push(Figure::against(
        "export s, merged",
        &col(&|r| r.journal.export_merged_s),
        &outs(&|r| &r.journal.cp_disk),
        "cp + fsync of the raw disk, s",
        secs,
    ));
    figures.push(Figure::alone(
        &format!("ack s, all {n} journal logs"),
        &col(&|r| r.journal.ack_s),
    ));
    figures.push(Figure::alone(
        "blocks rewritten by merge, scattered",
        &col(&|r| r.scattered.blocks_rewritten as f64),
    ));
    figures.push(Figure::alone(
        "blocks rewritten by merge, extents",
        &col(&|r| r.extents.blocks_rewritten as f64),
    ));
    for (label, pick) in [
        (
            "scattered 4 KiB".to_string(),
            Box::new(|r: &DeltaRun| r.scattered.merge_vault_per_changed_byte)
                as Box<dyn Fn(&DeltaRun) -> Option<f64>>,
        ),
        (
            "256 KiB extents".to_string(),
            Box::new(|r: &DeltaRun| r.extents.merge_vault_per_changed_byte),
        ),
        (
            format!("{n}-log journal"),
            Box::new(|r: &DeltaRun| r.journal.merge_vault_per_changed_byte),
        ),
    ] {
        let ours: Vec<f64> = runs.iter().filter_map(&pick).collect();
        figures.push(Figure::new(
            &format!("vault bytes per changed byte, merge, {label}"),
            &ours,
            &vec![Some(1.0); ours.len()],
            IN_PLACE,
        ));
    }
    figures.push(Figure::alone("protect s (setup)", &col(&|r| r.protect_s)));
    let mut notes = vec![
        "MB = 10^6 bytes; rates count log-file bytes (data + 4 KiB header + metadata blocks); ratios are ours/baseline: above 1 is better for MB/s, below 1 for s and ms".to_string(),
        format!("each pattern log writes {} of disk data; the journal writes {} in {n} logs (each half 4 KiB writes, half 256 KiB extents); write contents are the image's own data pages", crate::util::human_bytes(a.log_size), crate::util::human_bytes(a.journal_size)),
        "merge rewrites each touched 4 MiB block once (read, apply, hash, compress, seal, fsync); hrl apply writes the log's bytes in place in a plaintext raw file".to_string(),
        "vault bytes per changed byte: the server's drvault_store_bytes_written_total across the merge request (maps, chunks, records), over the disk bytes the logs write (overlapping writes counted each time)".to_string(),
        "every export was checked byte for byte against the raw disk with the same logs applied".to_string(),
        "agent, server and baselines share this machine; each run starts its own server on a fresh vault".to_string(),
    ];
    if runs.iter().any(|r| r.first == Pattern::Extents) {
        notes.push("the pattern sent first alternates between runs".into());
    }
    DeltasReport {
        tool: "drvault bench deltas",
        version: env!("CARGO_PKG_VERSION"),
        image,
        server,
        log_size: a.log_size,
        journal_logs: a.journal_logs,
        journal_size: a.journal_size,
        figures,
        runs,
        notes,
    }
}

pub fn table(r: &DeltasReport) -> String {
    let mut heading = vec![format!(
        "drvault bench deltas: {} image {} ({}, {}), {} run(s)",
        r.image.kind.map(|k| k.as_str()).unwrap_or("given"),
        r.image.path,
        crate::util::human_bytes(r.image.virtual_size),
        r.image.source,
        r.runs.len()
    )];
    if let Some(run) = r.runs.first() {
        for p in [&run.scattered, &run.extents] {
            heading.push(format!(
                "  {} log: {} writes, {} of data, {} file",
                p.log.pattern.describe(),
                p.log.writes,
                crate::util::human_bytes(p.log.data_bytes),
                crate::util::human_bytes(p.log.log_bytes)
            ));
        }
        heading.push(format!(
            "  journal: {} logs, {} of data, {} of log files",
            run.journal.logs,
            crate::util::human_bytes(run.journal.data_bytes),
            crate::util::human_bytes(run.journal.log_bytes)
        ));
    }
    heading.push(format!("  server: {}", r.server));
    report::figures_table(&heading, &r.figures, &r.notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    type Wrap = crate::bench::ArgsWrap<DeltasArgs>;

    fn args(extra: &[&str]) -> DeltasArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Wrap::try_parse_from(v).unwrap().a
    }

    #[test]
    fn defaults_and_argument_checks() {
        let a = args(&[]);
        assert_eq!(
            (a.image.size, a.log_size, a.journal_size),
            (2 << 30, 256 << 20, 256 << 20)
        );
        assert_eq!((a.journal_logs, a.runs), (50, 3));
        assert!(validate(&a, 2 << 30).is_ok());
        let refused = |extra: &[&str], disk: u64, why: &str| match validate(&args(extra), disk) {
            Err(BenchError::Invalid(m)) => assert!(m.contains(why), "{extra:?}: {m}"),
            other => panic!("{extra:?} must be refused, got {other:?}"),
        };
        refused(&[], 512 << 20, "quarter");
        refused(&["--log-size", "100K"], 2 << 30, "multiple of 256 KiB");
        refused(&["--runs", "0"], 2 << 30, "--runs");
        refused(&["--journal-logs", "0"], 2 << 30, "1-10000");
        refused(
            &["--journal-logs", "100", "--journal-size", "100K"],
            2 << 30,
            "4 KiB per log",
        );
        assert!(
            Wrap::try_parse_from(["x", "--server", "https://h"]).is_err(),
            "needs --creds"
        );
        assert!(Wrap::try_parse_from(["x", "--image", "i.img", "--size", "1G"]).is_err());
    }

    fn outcome(mb_s: f64) -> Outcome {
        Outcome::Ok(mb_s_measured(mb_s))
    }

    fn mb_s_measured(v: f64) -> baselines::Measured {
        baselines::Measured {
            seconds: 2.0,
            mb_s: v,
            cpu_s_per_gb: None,
            written_bytes: None,
        }
    }

    fn pattern(p: Pattern, ack_s: f64) -> PatternRun {
        PatternRun {
            log: LogFile {
                path: PathBuf::from("x.hrl"),
                unique_id: String::new(),
                pattern: p,
                writes: 1,
                data_bytes: 1,
                log_bytes: 100_000_000,
            },
            ack_s,
            ack_mb_s: 100.0 / ack_s,
            visible_ms: 2.0,
            merge_s: 4.0,
            merge_mb_s: 25.0,
            blocks_rewritten: 7,
            merge_vault_per_changed_byte: Some(if p == Pattern::Scattered { 4.5 } else { 1.5 }),
            apply: outcome(50.0),
            pipeline: outcome(400.0),
            cp: Outcome::Missing {
                note: "no cp".into(),
            },
        }
    }

    #[test]
    fn figures_take_medians_and_same_run_ratios() {
        let run = |s: f64| DeltaRun {
            vm: "v".into(),
            protect_s: 1.0,
            points_rtt_ms: 1.0,
            first: Pattern::Scattered,
            scattered: pattern(Pattern::Scattered, s),
            extents: pattern(Pattern::Extents, 1.0),
            journal: JournalRun {
                logs: 50,
                log_bytes: 1,
                data_bytes: 1,
                ack_s: 1.0,
                export_journal_s: 3.0,
                merge_s: 1.0,
                merge_mb_s: 10.0,
                blocks_rewritten: 1,
                merge_vault_per_changed_byte: None,
                export_merged_s: 2.0,
                apply: outcome(20.0),
                cp_disk: outcome(1.0),
            },
        };
        let r = build(
            ImageInfo::default(),
            "s".into(),
            &args(&[]),
            vec![run(1.0), run(4.0), run(2.0)],
        );
        let f = |name: &str, what: &str| {
            r.figures
                .iter()
                .find(|f| f.figure == name && f.baseline_what.starts_with(what))
                .unwrap_or_else(|| panic!("no figure {name} / {what}"))
                .clone()
        };
        let ack = f("ack MB/s, scattered 4 KiB", "in-process");
        assert_eq!(ack.ours, Some(50.0));
        assert_eq!(ack.ratio, Some(50.0 / 400.0));
        assert_eq!(ack.runs, vec![100.0, 25.0, 50.0]);
        let cp = f("ack MB/s, scattered 4 KiB", "missing");
        assert_eq!(cp.ratio, None, "a missing peer gives no ratio");
        assert_eq!(f("ack s, scattered vs extents", "ack s").ratio, Some(2.0));
        assert_eq!(
            f("merge MB/s of log, extents", "hrl apply").ratio,
            Some(0.5)
        );
        assert_eq!(
            f("export s, point behind 50 logs", "export").ratio,
            Some(1.5)
        );
        let merge_scattered = f(
            "vault bytes per changed byte, merge, scattered 4 KiB",
            "1: the changed bytes",
        );
        assert_eq!(
            (merge_scattered.ours, merge_scattered.ratio),
            (Some(4.5), Some(4.5))
        );
        // A server without the store byte count gives no figure, not a made-up one.
        let journal = f(
            "vault bytes per changed byte, merge, 50-log journal",
            "1: the changed bytes",
        );
        assert_eq!((journal.ours, journal.ratio), (None, None));
        let t = table(&r);
        assert!(t.contains("missing: no cp"), "{t}");
        assert!(t.contains("ack s, scattered vs extents"));
        let j: serde_json::Value = serde_json::from_str(&report::json(&r).unwrap()).unwrap();
        assert_eq!(j["runs"][0]["scattered"]["pipeline"]["status"], "ok");
        assert_eq!(j["figures"][0]["ours"], 50.0);
    }
}
