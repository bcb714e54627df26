//! The ingest report: per-run figures, medians, baselines and ratios; printed as a table
//! (figure | ours | baseline | ratio) or as one JSON document, and for agent sweeps as a CSV and
//! a PNG drawn by a small matplotlib script.
//!
//! Ratios are always ours / baseline: above 1 is better for rates, below 1 is better for CPU.
//! Medians are over the runs that produced the figure; the peak RSS is the maximum over runs.

use std::path::Path;

use serde::Serialize;

use super::baselines::{Measured, Outcome};
use super::images::{GeneratedImage, ImageKind, EXT4_FILL_PERCENT};
use super::{median_of, BenchError};

/// What was replicated.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ImageInfo {
    pub path: String,
    /// "generated", "cached" or "given".
    pub source: String,
    pub kind: Option<ImageKind>,
    pub format: String,
    pub virtual_size: u64,
    pub ext4_file_bytes: Option<u64>,
    pub ext4_files: Option<u64>,
    pub ext4_fill_target_percent: Option<u64>,
}

impl ImageInfo {
    pub fn given(p: &Path) -> ImageInfo {
        ImageInfo {
            path: p.display().to_string(),
            source: "given".into(),
            ..Default::default()
        }
    }

    pub fn generated(g: &GeneratedImage) -> ImageInfo {
        ImageInfo {
            path: g.path.display().to_string(),
            source: if g.generated_now {
                "generated"
            } else {
                "cached"
            }
            .into(),
            kind: Some(g.kind),
            ext4_file_bytes: g.file_bytes,
            ext4_files: g.files,
            ext4_fill_target_percent: (g.kind == ImageKind::Ext4).then_some(EXT4_FILL_PERCENT),
            ..Default::default()
        }
    }
}

/// One measured ingest run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RunFigures {
    pub agents: usize,
    pub wall_s: f64,
    pub logical_bytes: u64,
    /// Data-block bytes uploaded.
    pub sent_bytes: u64,
    /// Plain bytes of the data blocks (what had to travel before any compression).
    pub data_bytes: u64,
    /// Body bytes on the wire, from `wire_bytes_source`.
    pub wire_bytes: u64,
    /// The server's own count when it keeps one, else the agents' upload count.
    pub wire_bytes_source: String,
    /// `wire_bytes` / `data_bytes`.
    pub wire_per_data_byte: Option<f64>,
    /// Bytes the server wrote after compression and sealing.
    pub stored_bytes: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub uploaded_blocks: u64,
    pub deduplicated_blocks: u64,
    pub logical_mb_s: f64,
    pub sent_mb_s: f64,
    pub server_cpu_s: Option<f64>,
    pub server_cpu_s_per_gb: Option<f64>,
    /// CPU of this process (all agents) per logical GB.
    pub agent_cpu_s_per_gb: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_samples: usize,
    pub peak_server_rss_mib: Option<f64>,
}

/// The baselines of one round.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineRun {
    pub pipeline: Outcome,
    pub cp: Outcome,
    pub restic: Outcome,
    pub borg: Outcome,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Medians {
    pub logical_mb_s: Option<f64>,
    pub sent_mb_s: Option<f64>,
    pub server_cpu_s_per_gb: Option<f64>,
    pub agent_cpu_s_per_gb: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Maximum over runs.
    pub peak_server_rss_mib: Option<f64>,
    pub wall_s: Option<f64>,
    pub stored_bytes: Option<f64>,
    pub wire_per_data_byte: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct BaselineMedians {
    pub pipeline_mb_s: Option<f64>,
    pub pipeline_cpu_s_per_gb: Option<f64>,
    pub cp_mb_s: Option<f64>,
    pub cp_cpu_s_per_gb: Option<f64>,
    pub restic_mb_s: Option<f64>,
    pub restic_cpu_s_per_gb: Option<f64>,
    pub borg_mb_s: Option<f64>,
    pub borg_cpu_s_per_gb: Option<f64>,
    /// "ok", "missing", "failed", or "not run"; with the first note when not ok.
    pub pipeline_status: String,
    pub cp_status: String,
    pub restic_status: String,
    pub borg_status: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Ratios {
    pub mb_s_vs_pipeline: Option<f64>,
    pub mb_s_vs_cp: Option<f64>,
    pub mb_s_vs_restic: Option<f64>,
    pub mb_s_vs_borg: Option<f64>,
    pub cpu_vs_pipeline: Option<f64>,
    pub cpu_vs_restic: Option<f64>,
    pub cpu_vs_borg: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub image: ImageInfo,
    pub agents: usize,
    pub distinct: bool,
    pub parallel: usize,
    pub server: String,
    pub median: Medians,
    pub baseline_medians: BaselineMedians,
    pub ratios: Ratios,
    pub runs: Vec<RunFigures>,
    pub baselines: Vec<BaselineRun>,
    pub notes: Vec<String>,
}

fn status(items: &[BaselineRun], f: impl Fn(&BaselineRun) -> &Outcome) -> String {
    if items.is_empty() {
        return "not run".into();
    }
    for b in items {
        match f(b) {
            Outcome::Ok(_) => {}
            Outcome::Missing { note } => return format!("missing: {note}"),
            Outcome::Failed { note } => return format!("failed: {note}"),
        }
    }
    "ok".into()
}

fn m(o: &Outcome, f: impl Fn(&Measured) -> Option<f64>) -> Option<f64> {
    o.measured().and_then(f)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn ratios(ours: &Medians, base: &BaselineMedians) -> Ratios {
    Ratios {
        mb_s_vs_pipeline: ratio(ours.logical_mb_s, base.pipeline_mb_s),
        mb_s_vs_cp: ratio(ours.logical_mb_s, base.cp_mb_s),
        mb_s_vs_restic: ratio(ours.logical_mb_s, base.restic_mb_s),
        mb_s_vs_borg: ratio(ours.logical_mb_s, base.borg_mb_s),
        cpu_vs_pipeline: ratio(ours.server_cpu_s_per_gb, base.pipeline_cpu_s_per_gb),
        cpu_vs_restic: ratio(ours.server_cpu_s_per_gb, base.restic_cpu_s_per_gb),
        cpu_vs_borg: ratio(ours.server_cpu_s_per_gb, base.borg_cpu_s_per_gb),
    }
}

pub fn build(
    image: ImageInfo,
    agents: usize,
    distinct: bool,
    parallel: usize,
    server: String,
    runs: Vec<RunFigures>,
    baselines: Vec<BaselineRun>,
) -> Report {
    let median = Medians {
        logical_mb_s: median_of(&runs, |r| Some(r.logical_mb_s)),
        sent_mb_s: median_of(&runs, |r| Some(r.sent_mb_s)),
        server_cpu_s_per_gb: median_of(&runs, |r| r.server_cpu_s_per_gb),
        agent_cpu_s_per_gb: median_of(&runs, |r| Some(r.agent_cpu_s_per_gb)),
        latency_p50_ms: median_of(&runs, |r| r.latency_p50_ms),
        latency_p99_ms: median_of(&runs, |r| r.latency_p99_ms),
        peak_server_rss_mib: runs
            .iter()
            .filter_map(|r| r.peak_server_rss_mib)
            .max_by(f64::total_cmp),
        wall_s: median_of(&runs, |r| Some(r.wall_s)),
        stored_bytes: median_of(&runs, |r| Some(r.stored_bytes as f64)),
        wire_per_data_byte: median_of(&runs, |r| r.wire_per_data_byte),
    };
    let b = &baselines;
    let base = BaselineMedians {
        pipeline_mb_s: median_of(b, |x| m(&x.pipeline, |v| Some(v.mb_s))),
        pipeline_cpu_s_per_gb: median_of(b, |x| m(&x.pipeline, |v| v.cpu_s_per_gb)),
        cp_mb_s: median_of(b, |x| m(&x.cp, |v| Some(v.mb_s))),
        cp_cpu_s_per_gb: median_of(b, |x| m(&x.cp, |v| v.cpu_s_per_gb)),
        restic_mb_s: median_of(b, |x| m(&x.restic, |v| Some(v.mb_s))),
        restic_cpu_s_per_gb: median_of(b, |x| m(&x.restic, |v| v.cpu_s_per_gb)),
        borg_mb_s: median_of(b, |x| m(&x.borg, |v| Some(v.mb_s))),
        borg_cpu_s_per_gb: median_of(b, |x| m(&x.borg, |v| v.cpu_s_per_gb)),
        pipeline_status: status(b, |x| &x.pipeline),
        cp_status: status(b, |x| &x.cp),
        restic_status: status(b, |x| &x.restic),
        borg_status: status(b, |x| &x.borg),
    };
    let mut notes = vec![
        "MB = 10^6 bytes; logical = virtual disk bytes of all agents (zero blocks included); ratios are ours/baseline".to_string(),
        "agents run in the bench process on the same machine as the server".to_string(),
    ];
    notes.push(if distinct {
        "--distinct: each agent replicates its own variant of the image (one byte per 4 KiB data page XORed with a per-agent salt), so nothing dedups across agents".to_string()
    } else {
        "--distinct=false: agents replicate identical images; the server deduplicates all but the first copy, so the figure is optimistic".to_string()
    });
    if let Some(p) = image.ext4_fill_target_percent {
        notes.push(format!(
            "ext4 image: mkfs.ext4 -d over real files from /usr/share and /usr/lib filling ~{p}% of the size"
        ));
    }
    notes.push("baselines are for one copy of the image (independent of the agent count): in-process pipeline = read+zero check+hash+zstd-1+AES-GCM+fsynced put, 2 CPU threads; cp = cp + fsync of the copy; restic = backup into a fresh format-2 repo; borg = borg create --compression zstd,3 into a fresh repokey-encrypted repo".to_string());
    Report {
        tool: "drvault bench ingest",
        version: env!("CARGO_PKG_VERSION"),
        ratios: ratios(&median, &base),
        image,
        agents,
        distinct,
        parallel,
        server,
        median,
        baseline_medians: base,
        runs,
        baselines,
        notes,
    }
}

pub fn to_json(r: &Report) -> Result<String, BenchError> {
    serde_json::to_string_pretty(r)
        .map_err(|e| BenchError::Invalid(format!("encoding report: {e}")))
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn row(out: &mut String, figure: &str, ours: Option<f64>, base: Option<f64>, what: &str) {
    let r = ratio(ours, base);
    let b = match base {
        Some(_) => format!("{} ({what})", num(base)),
        None if what.is_empty() => String::new(),
        None => format!("- ({what})"),
    };
    let rs = if base.is_some() {
        num(r)
    } else {
        String::new()
    };
    out.push_str(&format!(
        "{figure:<30} | {:>9} | {b:<36} | {rs:>6}\n",
        num(ours)
    ));
}

/// The human table.
pub fn table(r: &Report) -> String {
    let mut o = String::new();
    let img = &r.image;
    o.push_str(&format!(
        "drvault bench ingest: {} agent(s), {} image {} ({}, {}), {} run(s), parallel {} per agent\n",
        r.agents,
        img.kind.map(|k| k.as_str()).unwrap_or("given"),
        img.path,
        crate::util::human_bytes(img.virtual_size),
        img.source,
        r.runs.len(),
        r.parallel,
    ));
    if let (Some(b), Some(n)) = (img.ext4_file_bytes, img.ext4_files) {
        o.push_str(&format!(
            "  ext4 content: {n} files, {} of file data\n",
            crate::util::human_bytes(b)
        ));
    }
    if let Some(run) = r.runs.first() {
        o.push_str(&format!(
            "  per run: {} data blocks, {} zero blocks, {} sent, {} stored after compression\n",
            run.data_blocks,
            run.zero_blocks,
            crate::util::human_bytes(run.sent_bytes),
            crate::util::human_bytes(run.stored_bytes)
        ));
    }
    o.push_str(&format!("  server: {}\n\n", r.server));
    o.push_str(&format!(
        "{:<30} | {:>9} | {:<36} | {:>6}\n",
        "figure (median)", "ours", "baseline", "ratio"
    ));
    o.push_str(&format!("{}\n", "-".repeat(30 + 3 + 9 + 3 + 36 + 3 + 6)));
    let (md, b) = (&r.median, &r.baseline_medians);
    let st = |s: &str, ok: &str| {
        if s == "ok" {
            ok.to_string()
        } else {
            s.to_string()
        }
    };
    row(
        &mut o,
        "logical MB/s",
        md.logical_mb_s,
        b.pipeline_mb_s,
        &st(&b.pipeline_status, "in-process pipeline"),
    );
    row(
        &mut o,
        "logical MB/s",
        md.logical_mb_s,
        b.cp_mb_s,
        &st(&b.cp_status, "cp + fsync"),
    );
    row(
        &mut o,
        "logical MB/s",
        md.logical_mb_s,
        b.restic_mb_s,
        &st(&b.restic_status, "restic backup"),
    );
    row(
        &mut o,
        "logical MB/s",
        md.logical_mb_s,
        b.borg_mb_s,
        &st(&b.borg_status, "borg create zstd,3"),
    );
    row(&mut o, "MB/s sent (data blocks)", md.sent_mb_s, None, "");
    let wire_what = r
        .runs
        .first()
        .map(|x| x.wire_bytes_source.clone())
        .unwrap_or_default();
    row(
        &mut o,
        "wire bytes per data byte",
        md.wire_per_data_byte,
        None,
        &wire_what,
    );
    row(
        &mut o,
        "server CPU s/GB",
        md.server_cpu_s_per_gb,
        b.pipeline_cpu_s_per_gb,
        "pipeline CPU s/GB",
    );
    row(
        &mut o,
        "server CPU s/GB",
        md.server_cpu_s_per_gb,
        b.restic_cpu_s_per_gb,
        "restic CPU s/GB",
    );
    row(
        &mut o,
        "server CPU s/GB",
        md.server_cpu_s_per_gb,
        b.borg_cpu_s_per_gb,
        "borg CPU s/GB",
    );
    row(
        &mut o,
        "agent CPU s/GB (all agents)",
        md.agent_cpu_s_per_gb,
        None,
        "",
    );
    row(
        &mut o,
        "block PUT latency p50 ms",
        md.latency_p50_ms,
        None,
        "",
    );
    row(
        &mut o,
        "block PUT latency p99 ms",
        md.latency_p99_ms,
        None,
        "",
    );
    row(
        &mut o,
        "peak server RSS MiB (max)",
        md.peak_server_rss_mib,
        None,
        "",
    );
    row(&mut o, "wall s", md.wall_s, None, "");
    o.push('\n');
    for n in &r.notes {
        o.push_str(&format!("note: {n}\n"));
    }
    o
}

/// One row of the `bench deltas` / `bench failover` reports: a figure of ours next to a
/// baseline measured in the same runs. Both are medians over the runs that produced them; the
/// ratio is ours / baseline (for rates above 1 is better, for times below 1).
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub figure: String,
    pub ours: Option<f64>,
    pub baseline: Option<f64>,
    /// What the baseline is, or why there is none ("missing: …", "failed: …", "not run").
    pub baseline_what: String,
    pub ratio: Option<f64>,
    /// Our per-run values, in run order.
    pub runs: Vec<f64>,
}

impl Figure {
    /// A figure from per-run values; `base` holds the baseline's per-run outcomes (the
    /// first non-ok one names the reason when none is ok).
    pub fn new(figure: &str, ours: &[f64], base: &[Option<f64>], what: &str) -> Figure {
        let ours_m = super::median(ours);
        let vals: Vec<f64> = base.iter().flatten().copied().collect();
        let baseline = super::median(&vals);
        Figure {
            figure: figure.to_string(),
            ours: ours_m,
            baseline,
            baseline_what: what.to_string(),
            ratio: ratio(ours_m, baseline),
            runs: ours.to_vec(),
        }
    }

    /// A figure against a baseline that may be missing or failed in some runs.
    pub fn against(
        figure: &str,
        ours: &[f64],
        base: &[&Outcome],
        what: &str,
        pick: impl Fn(&Measured) -> f64,
    ) -> Figure {
        let vals: Vec<Option<f64>> = base.iter().map(|o| o.measured().map(&pick)).collect();
        let mut f = Figure::new(figure, ours, &vals, what);
        if f.baseline.is_none() {
            f.baseline_what = match base.iter().find(|o| o.measured().is_none()) {
                Some(Outcome::Missing { note }) => format!("missing: {note}"),
                Some(Outcome::Failed { note }) => format!("failed: {note}"),
                _ => "not run".into(),
            };
        }
        f
    }

    /// A figure without a baseline.
    pub fn alone(figure: &str, ours: &[f64]) -> Figure {
        Figure::new(figure, ours, &[], "")
    }
}

/// The table of a figure report: heading lines, rows, notes.
pub fn figures_table(heading: &[String], figures: &[Figure], notes: &[String]) -> String {
    let mut o = String::new();
    for h in heading {
        o.push_str(h);
        o.push('\n');
    }
    o.push('\n');
    let w = figures
        .iter()
        .map(|f| f.figure.len())
        .max()
        .unwrap_or(6)
        .max(15);
    let bw = figures
        .iter()
        .map(|f| f.baseline_what.len() + 12)
        .max()
        .unwrap_or(8)
        .clamp(8, 72);
    o.push_str(&format!(
        "{:<w$} | {:>9} | {:<bw$} | {:>6}\n",
        "figure (median)", "ours", "baseline", "ratio"
    ));
    o.push_str(&format!("{}\n", "-".repeat(w + bw + 27)));
    for f in figures {
        let b = match (f.baseline, f.baseline_what.is_empty()) {
            (_, true) => String::new(),
            (Some(v), false) => format!("{} ({})", num(Some(v)), f.baseline_what),
            (None, false) => format!("- ({})", f.baseline_what),
        };
        let r = if f.baseline.is_some() {
            num(f.ratio)
        } else {
            String::new()
        };
        o.push_str(&format!(
            "{:<w$} | {:>9} | {b:<bw$} | {r:>6}\n",
            f.figure,
            num(f.ours)
        ));
    }
    o.push('\n');
    for n in notes {
        o.push_str(&format!("note: {n}\n"));
    }
    o
}

/// A report as pretty JSON.
pub fn json<T: Serialize>(r: &T) -> Result<String, BenchError> {
    serde_json::to_string_pretty(r)
        .map_err(|e| BenchError::Invalid(format!("encoding report: {e}")))
}

/// What became of `--plot`.
#[derive(Debug, Clone, Serialize)]
pub struct PlotOutcome {
    pub csv: String,
    pub png: Option<String>,
    pub note: String,
}

pub fn sweep_csv(points: &[Report]) -> String {
    let mut s = String::from(
        "agents,logical_mb_s,sent_mb_s,server_cpu_s_per_gb,agent_cpu_s_per_gb,latency_p50_ms,latency_p99_ms,peak_server_rss_mib,pipeline_mb_s\n",
    );
    let f = |v: Option<f64>| v.map(|x| format!("{x:.3}")).unwrap_or_default();
    for p in points {
        let md = &p.median;
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            p.agents,
            f(md.logical_mb_s),
            f(md.sent_mb_s),
            f(md.server_cpu_s_per_gb),
            f(md.agent_cpu_s_per_gb),
            f(md.latency_p50_ms),
            f(md.latency_p99_ms),
            f(md.peak_server_rss_mib),
            f(p.baseline_medians.pipeline_mb_s),
        ));
    }
    s
}

const PLOT_PY: &str = r#"
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = list(csv.DictReader(open(sys.argv[1])))
x = [int(r["agents"]) for r in rows]
fig, ax = plt.subplots(figsize=(6.4, 4.2))
ax.plot(x, [float(r["logical_mb_s"]) for r in rows], marker="o", label="ingest, logical MB/s")
ax.plot(x, [float(r["sent_mb_s"]) for r in rows], marker="s", label="ingest, MB/s sent")
if rows and rows[0]["pipeline_mb_s"]:
    ax.axhline(float(rows[0]["pipeline_mb_s"]), linestyle="--", color="gray",
               label="in-process pipeline (1 image)")
ax.set_xscale("log", base=2)
ax.set_xticks(x)
ax.set_xticklabels([str(v) for v in x])
ax.set_xlabel("concurrent agents")
ax.set_ylabel("MB/s (10^6 B/s)")
ax.set_ylim(bottom=0)
ax.set_title(sys.argv[3], fontsize=9)
ax.grid(True, alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=120)
"#;

/// Writes the CSV next to `png` and draws the PNG with python3 + matplotlib when available.
pub fn plot(points: &[Report], png: &Path) -> PlotOutcome {
    let csv = png.with_extension("csv");
    let csv_s = csv.display().to_string();
    if let Err(e) = std::fs::write(&csv, sweep_csv(points)) {
        return PlotOutcome {
            csv: csv_s,
            png: None,
            note: format!("could not write the CSV: {e}"),
        };
    }
    let title = points
        .first()
        .map(|p| {
            format!(
                "drvault ingest, {} image {}, {}",
                p.image.kind.map(|k| k.as_str()).unwrap_or("given"),
                crate::util::human_bytes(p.image.virtual_size),
                if p.distinct {
                    "distinct per agent"
                } else {
                    "identical images"
                }
            )
        })
        .unwrap_or_default();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(PLOT_PY)
        .arg(&csv)
        .arg(png)
        .arg(title)
        .output();
    match out {
        Ok(o) if o.status.success() => PlotOutcome {
            csv: csv_s,
            png: Some(png.display().to_string()),
            note: "drawn with python3 + matplotlib".into(),
        },
        Ok(o) => PlotOutcome {
            csv: csv_s,
            png: None,
            note: format!(
                "no PNG: python3/matplotlib failed ({}); the CSV holds the figures (pip install matplotlib)",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            ),
        },
        Err(e) => PlotOutcome {
            csv: csv_s,
            png: None,
            note: format!("no PNG: cannot run python3 ({e}); the CSV holds the figures"),
        },
    }
}

pub fn sweep_table(points: &[Report], plot: &PlotOutcome) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        "{:>6} | {:>12} | {:>9} | {:>15} | {:>14} | {:>7} | {:>7} | {:>8}\n",
        "agents",
        "logical MB/s",
        "sent MB/s",
        "server CPU s/GB",
        "agent CPU s/GB",
        "p50 ms",
        "p99 ms",
        "RSS MiB"
    ));
    for p in points {
        let md = &p.median;
        o.push_str(&format!(
            "{:>6} | {:>12} | {:>9} | {:>15} | {:>14} | {:>7} | {:>7} | {:>8}\n",
            p.agents,
            num(md.logical_mb_s),
            num(md.sent_mb_s),
            num(md.server_cpu_s_per_gb),
            num(md.agent_cpu_s_per_gb),
            num(md.latency_p50_ms),
            num(md.latency_p99_ms),
            num(md.peak_server_rss_mib)
        ));
    }
    if let Some(p) = points.first() {
        let b = &p.baseline_medians;
        o.push_str(&format!(
            "baselines (one image): pipeline {} MB/s, cp+fsync {} MB/s, restic {} MB/s ({}), borg {} MB/s ({})\n",
            num(b.pipeline_mb_s),
            num(b.cp_mb_s),
            num(b.restic_mb_s),
            b.restic_status,
            num(b.borg_mb_s),
            b.borg_status
        ));
    }
    o.push_str(&format!(
        "csv: {}\npng: {} ({})\n",
        plot.csv,
        plot.png.as_deref().unwrap_or("-"),
        plot.note
    ));
    o
}

pub fn sweep_json(points: &[Report], plot: &PlotOutcome) -> Result<String, BenchError> {
    serde_json::to_string_pretty(&serde_json::json!({ "points": points, "plot": plot }))
        .map_err(|e| BenchError::Invalid(format!("encoding report: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mb_s: f64, rss: f64) -> RunFigures {
        RunFigures {
            agents: 1,
            logical_mb_s: mb_s,
            sent_mb_s: mb_s / 2.0,
            server_cpu_s_per_gb: Some(2.0),
            peak_server_rss_mib: Some(rss),
            latency_p50_ms: Some(10.0),
            ..Default::default()
        }
    }

    fn ok(mb_s: f64, cpu: f64) -> Outcome {
        Outcome::Ok(Measured {
            seconds: 1.0,
            mb_s,
            cpu_s_per_gb: Some(cpu),
            written_bytes: None,
        })
    }

    #[test]
    fn medians_max_rss_and_ratios() {
        let b = |p| BaselineRun {
            pipeline: ok(p, 1.0),
            cp: ok(1000.0, 0.1),
            restic: Outcome::Missing {
                note: "restic is not installed".into(),
            },
            borg: ok(50.0, 4.0),
        };
        let r = build(
            ImageInfo::default(),
            1,
            true,
            4,
            "s".into(),
            vec![run(100.0, 50.0), run(300.0, 70.0), run(200.0, 60.0)],
            vec![b(400.0), b(500.0), b(300.0)],
        );
        assert_eq!(r.median.logical_mb_s, Some(200.0));
        assert_eq!(r.median.peak_server_rss_mib, Some(70.0));
        assert_eq!(r.baseline_medians.pipeline_mb_s, Some(400.0));
        assert_eq!(r.ratios.mb_s_vs_pipeline, Some(0.5));
        assert_eq!(r.ratios.mb_s_vs_cp, Some(0.2));
        assert_eq!(r.ratios.cpu_vs_pipeline, Some(2.0));
        assert_eq!(r.ratios.mb_s_vs_restic, None, "no figure is made up");
        assert!(r.baseline_medians.restic_status.starts_with("missing"));
        // borg at 50 MB/s and 4 CPU s/GB: ours is 4x its rate at half its CPU.
        assert_eq!(r.baseline_medians.borg_status, "ok");
        assert_eq!(r.ratios.mb_s_vs_borg, Some(4.0));
        assert_eq!(r.ratios.cpu_vs_borg, Some(0.5));
        let t = table(&r);
        assert!(t.contains("missing: restic is not installed"), "{t}");
        assert!(t.contains("in-process pipeline"));
        assert!(t.contains("borg create zstd,3"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&to_json(&r).unwrap()).unwrap();
        assert_eq!(j["median"]["logical_mb_s"], 200.0);
        assert_eq!(j["baselines"][0]["restic"]["status"], "missing");
    }

    #[test]
    fn no_baselines_means_no_ratios() {
        let r = build(
            ImageInfo::default(),
            2,
            false,
            4,
            "s".into(),
            vec![run(1.0, 1.0)],
            vec![],
        );
        assert_eq!(r.baseline_medians.pipeline_status, "not run");
        assert!(r.ratios.mb_s_vs_pipeline.is_none());
        assert!(r.notes.iter().any(|n| n.contains("optimistic")));
    }

    #[test]
    fn sweep_csv_has_one_line_per_agent_count() {
        let mk = |n| {
            let mut r = build(
                ImageInfo::default(),
                n,
                true,
                4,
                "s".into(),
                vec![run(10.0 * n as f64, 1.0)],
                vec![],
            );
            r.agents = n;
            r
        };
        let csv = sweep_csv(&[mk(1), mk(2)]);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("agents,logical_mb_s"));
        assert!(lines[2].starts_with("2,20.000,10.000,"));
    }
}
