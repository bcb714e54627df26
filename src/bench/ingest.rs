//! `drvault bench ingest`: N reference agents replicate one image into a server, K times.
//!
//! By default every run spawns this same binary as `drvault serve --listen 127.0.0.1:0
//! --data-dir <work>/runs/<run>/data`, reads the URL from the `server.json` it writes, registers
//! a host with the operator token, and stops the server with SIGTERM at the end (the data
//! directory is then removed). With `--creds FILE` the agents target an existing server instead;
//! the server-side figures (CPU, RSS) are then not available.
//!
//! The order within one invocation: generate or reuse the image; read it once (page cache warm);
//! one discarded warm-up run (1 agent, the first `--warmup-size` bytes); then K rounds, each one
//! measured ingest run followed by the baselines (interleaved, so that a neighbour's load on a
//! shared machine hits both sides). Figures are medians over the K rounds; the peak RSS is the
//! maximum.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::baselines::{self, Outcome};
use super::images::{self, DistinctImage, Gaps, PrefixImage};
use super::procstat::{clock_ticks_per_second, cpu_ticks, peak_rss_kib};
use super::report::{self, BaselineRun, ImageInfo, Report, RunFigures};
use super::server::server_counter;
use super::server::SpawnedServer;
use super::{io_err, parse_size_arg, percentile, BenchError};
use crate::agent::backoff::Backoff;
use crate::agent::protect::{protect, DiskSource, ProtectOptions, ProtectSummary};
use crate::format::image::DiskImage;
use crate::wire::Credentials;

#[derive(clap::Args, Debug, Clone)]
pub struct IngestArgs {
    #[command(flatten)]
    pub image: images::ImageArgs,
    /// Concurrent agents (each protects its own VM with one disk).
    #[arg(long, default_value_t = 1)]
    pub agents: usize,
    /// With --plot: the agent counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub agents_list: Vec<usize>,
    /// Give each agent a different variant of the image so the server cannot deduplicate one
    /// agent's blocks against another's (the honest figure). --distinct=false measures N
    /// identical disks.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub distinct: bool,
    /// Block uploads in flight per agent (as `agent protect --parallel`).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Measured rounds; figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Bytes of the image the discarded warm-up run replicates (0: no warm-up run).
    #[arg(long, default_value = "256MiB", value_parser = parse_warmup)]
    pub warmup_size: u64,
    /// Target an existing server with these host credentials instead of spawning one.
    #[arg(long)]
    pub creds: Option<PathBuf>,
    /// With --creds: override the server URL written in the credentials.
    #[arg(long, requires = "creds")]
    pub server: Option<String>,
    /// Skip the pipeline, cp, restic and borg baselines.
    #[arg(long)]
    pub no_baselines: bool,
    /// Print one JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measure every count of --agents-list and draw ingest MB/s against agents into this PNG
    /// (a CSV with the same name is always written).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Also replicate a raw image of this size holding the same data blocks spread out, with
    /// --gaps between them, and report its time against the image's (issue 7: at most 1.3x).
    #[arg(long, value_parser = parse_size_arg, conflicts_with_all = ["plot", "image"])]
    pub sparse_to: Option<u64>,
    /// With --sparse-to: what lies between the data blocks (holes, written zeros, or one image
    /// of each).
    #[arg(long, value_enum, default_value_t = GapsArg::Holes, requires = "sparse_to")]
    pub gaps: GapsArg,
}

/// `--gaps`: one spread image or both.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GapsArg {
    Holes,
    Zeros,
    Both,
}

impl GapsArg {
    pub fn list(self) -> Vec<Gaps> {
        match self {
            GapsArg::Holes => vec![Gaps::Holes],
            GapsArg::Zeros => vec![Gaps::Zeros],
            GapsArg::Both => vec![Gaps::Holes, Gaps::Zeros],
        }
    }
}

fn parse_warmup(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    parse_size_arg(s)
}

/// Highest agent count: each agent's variant is salted with a distinct non-zero byte.
pub const MAX_AGENTS: usize = 255;

/// Where the agents send their blocks.
enum Target {
    /// Spawn `exe serve` per run.
    Spawn {
        exe: PathBuf,
    },
    Remote {
        creds: Credentials,
    },
}

/// What every run needs.
pub(super) struct Ctx {
    pub(super) work: PathBuf,
    pub(super) image_path: PathBuf,
    pub(super) image: Arc<dyn DiskImage>,
    target: Target,
    pub(super) tck: u64,
    pub(super) distinct: bool,
    pub(super) parallel: usize,
}

impl Ctx {
    /// Where the agents send their blocks, as the report shows it.
    pub(super) fn server(&self) -> String {
        match &self.target {
            Target::Spawn { .. } => "spawned per run (127.0.0.1, fresh data dir)".to_string(),
            Target::Remote { creds } => creds.server.clone(),
        }
    }
}

pub async fn run(args: IngestArgs) -> Result<i32, BenchError> {
    validate(&args)?;
    let load_at_start = super::load_average();
    let prepared = images::prepare(&args.image).await?;
    let (work, image_path, image) = (prepared.work, prepared.path, prepared.image);
    let target = match &args.creds {
        Some(f) => Target::Remote {
            creds: super::server::load_creds(f, args.server.as_deref())?,
        },
        None => Target::Spawn {
            exe: std::env::current_exe().map_err(io_err("locating", Path::new("this binary")))?,
        },
    };
    let ctx = Ctx {
        work: work.clone(),
        image_path: image_path.clone(),
        image: image.clone(),
        target,
        tck: clock_ticks_per_second(),
        distinct: args.distinct,
        parallel: args.parallel,
    };
    let info = prepared.info;
    images::warm_page_cache(&image_path)?;
    if args.warmup_size > 0 {
        eprintln!("bench: warm-up run (discarded)");
        let short: Arc<dyn DiskImage> = Arc::new(PrefixImage::new(image.clone(), args.warmup_size));
        ingest_once(&ctx, short, &image_path, 1, "warmup").await?;
    }
    if let Some(size) = args.sparse_to {
        return super::sparse::run(&ctx, &args, size, info).await;
    }

    match &args.plot {
        None => {
            let mut r = measure(&ctx, &args, args.agents, !args.no_baselines, &info).await?;
            r.notes.push(super::load_note(&load_at_start));
            if args.json {
                println!("{}", report::to_json(&r)?);
            } else {
                print!("{}", report::table(&r));
            }
        }
        Some(png) => {
            let mut points: Vec<Report> = Vec::new();
            for (i, &n) in args.agents_list.iter().enumerate() {
                // Baselines do not depend on the agent count: measured with the first count.
                let mut r = measure(&ctx, &args, n, i == 0 && !args.no_baselines, &info).await?;
                if let Some(first) = points.first() {
                    r.baselines = first.baselines.clone();
                    r.baseline_medians = first.baseline_medians.clone();
                    r.ratios = report::ratios(&r.median, &r.baseline_medians);
                }
                r.notes.push(super::load_note(&load_at_start));
                points.push(r);
            }
            let plot = report::plot(&points, png);
            if args.json {
                println!("{}", report::sweep_json(&points, &plot)?);
            } else {
                print!("{}", report::sweep_table(&points, &plot));
            }
        }
    }
    Ok(0)
}

fn validate(args: &IngestArgs) -> Result<(), BenchError> {
    let counts: Vec<usize> = match &args.plot {
        Some(_) => args.agents_list.clone(),
        None => vec![args.agents],
    };
    if counts.is_empty() || counts.iter().any(|&n| n == 0 || n > MAX_AGENTS) {
        return Err(BenchError::Invalid(format!(
            "agent counts {counts:?}: each must be 1-{MAX_AGENTS}"
        )));
    }
    if args.runs == 0 || args.parallel == 0 {
        return Err(BenchError::Invalid(
            "--runs and --parallel must be at least 1".into(),
        ));
    }
    Ok(())
}

/// K rounds of (ingest run, baselines) with `agents` agents.
async fn measure(
    ctx: &Ctx,
    args: &IngestArgs,
    agents: usize,
    with_baselines: bool,
    info: &ImageInfo,
) -> Result<Report, BenchError> {
    let mut runs = Vec::new();
    let mut bases = Vec::new();
    for k in 0..args.runs {
        eprintln!(
            "bench: round {}/{}: {agents} agent(s) replicating {}",
            k + 1,
            args.runs,
            crate::util::human_bytes(ctx.image.virtual_size())
        );
        let label = format!("a{agents}-r{k}");
        runs.push(ingest_once(ctx, ctx.image.clone(), &ctx.image_path, agents, &label).await?);
        if with_baselines {
            bases.push(baselines_once(ctx).await?);
        }
    }
    Ok(report::build(
        info.clone(),
        agents,
        ctx.distinct,
        ctx.parallel,
        ctx.server(),
        runs,
        bases,
    ))
}

async fn baselines_once(ctx: &Ctx) -> Result<BaselineRun, BenchError> {
    let dir = ctx.work.join("runs").join("baselines");
    eprintln!("bench:   baselines: pipeline, cp, restic, borg");
    let pipeline =
        match baselines::pipeline(ctx.image.clone(), &dir.join("pipeline"), ctx.tck).await {
            Ok(m) => Outcome::Ok(m),
            Err(e) => Outcome::Failed {
                note: e.to_string(),
            },
        };
    let cp = baselines::cp(&ctx.image_path, &dir, ctx.tck).await;
    let restic = baselines::restic(&ctx.image_path, &dir, ctx.tck).await;
    let borg = baselines::borg(&ctx.image_path, &dir, ctx.tck).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(BaselineRun {
        pipeline,
        cp,
        restic,
        borg,
    })
}

/// One measured (or warm-up) replication of `image` (the file `path`) by `agents` agents.
pub(super) async fn ingest_once(
    ctx: &Ctx,
    image: Arc<dyn DiskImage>,
    path: &Path,
    agents: usize,
    label: &str,
) -> Result<RunFigures, BenchError> {
    let run_dir = ctx.work.join("runs").join(label);
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(io_err("creating", &run_dir))?;
    let (server, creds) = match &ctx.target {
        Target::Spawn { exe } => {
            let (s, c) = SpawnedServer::with_host(exe, &run_dir).await?;
            (Some(s), c)
        }
        Target::Remote { creds } => (None, creds.clone()),
    };
    let pid = server.as_ref().map(|s| s.pid);
    let result = drive_agents(ctx, image, path, agents, &creds, pid).await;
    if let Some(s) = server {
        s.stop().await?;
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    result
}

async fn drive_agents(
    ctx: &Ctx,
    image: Arc<dyn DiskImage>,
    path: &Path,
    agents: usize,
    creds: &Credentials,
    server_pid: Option<u32>,
) -> Result<RunFigures, BenchError> {
    // Unique VM names: an existing server keeps VMs of earlier runs.
    let mut tag = [0u8; 4];
    crate::util::fill_random(&mut tag);
    let tag = hex::encode(tag);
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let mut jobs = Vec::new();
    for k in 0..agents {
        // One client per agent: separate connections, as separate hosts' agents would have.
        let client = crate::agent::client_for(creds, None).map_err(|e| BenchError::Agent {
            vm: format!("bench-{tag}-{k}"),
            source: Box::new(e),
        })?;
        let img: Arc<dyn DiskImage> = if ctx.distinct {
            let salt = u8::try_from(k + 1)
                .map_err(|_| BenchError::Invalid(format!("agent {k}: over {MAX_AGENTS}")))?;
            Arc::new(DistinctImage::new(image.clone(), salt)?)
        } else {
            image.clone()
        };
        let source = DiskSource {
            id: "disk0".into(),
            path: path.to_path_buf(),
            image: img,
        };
        let opts = ProtectOptions {
            vm: format!("bench-{tag}-{k}"),
            generation: 2,
            cpus: 2,
            memory_mib: 4096,
            nics: Vec::new(),
            policy: None,
            parallel: ctx.parallel,
            // Retries should not happen on a local run; if they do, short waits keep the run
            // going and the latency figures show them.
            backoff: Backoff {
                scale: 0.01,
                give_up_after: Duration::from_secs(120),
            },
            progress: false,
            upload_latencies: Some(latencies.clone()),
            throttle: None,
        };
        jobs.push((client, source, opts));
    }
    // The server's count of body bytes received, when it keeps one; else the agents' own.
    let metrics = crate::agent::client_for(creds, None).map_err(|e| BenchError::Agent {
        vm: "-".into(),
        source: Box::new(e),
    })?;
    let wire0 = server_counter(&metrics, WIRE_COUNTER).await?;
    let server_cpu0 = match server_pid {
        Some(p) => Some(cpu_ticks(&p.to_string())?),
        None => None,
    };
    let self_cpu0 = cpu_ticks("self")?;
    let start = Instant::now();
    let results =
        futures_util::future::join_all(jobs.iter().map(|(client, source, opts)| async move {
            protect(client, std::slice::from_ref(source), opts)
                .await
                .map_err(|e| BenchError::Agent {
                    vm: opts.vm.clone(),
                    source: Box::new(e),
                })
        }))
        .await;
    let wall = start.elapsed().as_secs_f64();
    let self_cpu1 = cpu_ticks("self")?;
    let (server_cpu_s, peak_kib) = match (server_pid, server_cpu0) {
        (Some(p), Some(c0)) => {
            let pid = p.to_string();
            let c1 = cpu_ticks(&pid)?;
            (
                Some(c1.own.saturating_sub(c0.own) as f64 / ctx.tck as f64),
                Some(peak_rss_kib(&pid)?),
            )
        }
        _ => (None, None),
    };
    let summaries: Vec<ProtectSummary> = results.into_iter().collect::<Result<_, _>>()?;
    let wire1 = server_counter(&metrics, WIRE_COUNTER).await?;
    let lat = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut f = figures(
        &summaries,
        image.virtual_size(),
        wall,
        server_cpu_s,
        self_cpu1.own.saturating_sub(self_cpu0.own) as f64 / ctx.tck as f64,
        peak_kib,
        &lat,
    );
    if let Some(w1) = wire1 {
        f.wire_bytes = (w1 - wire0.unwrap_or(0.0)).max(0.0) as u64;
        f.wire_bytes_source = format!("server {WIRE_COUNTER}");
        f.wire_per_data_byte = ratio_of(f.wire_bytes, f.data_bytes);
    }
    Ok(f)
}

/// The server's count of request body bytes as they arrived (compressed when sent so).
pub(super) const WIRE_COUNTER: &str = "drvault_wire_bytes_received_total";

fn ratio_of(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Bytes of a disk's data blocks: the block size is the power of two the block count implies
/// (the server's, which the agent does not report), the last block possibly short.
fn data_bytes(size: u64, blocks: u64, data_blocks: u64) -> u64 {
    if blocks == 0 {
        return 0;
    }
    let block = size.div_ceil(blocks).next_power_of_two();
    data_blocks.saturating_mul(block).min(size)
}

/// Turns what the agents reported into the run's figures.
fn figures(
    summaries: &[ProtectSummary],
    disk_size: u64,
    wall: f64,
    server_cpu_s: Option<f64>,
    agent_cpu_s: f64,
    peak_kib: Option<u64>,
    latencies_s: &[f64],
) -> RunFigures {
    let disks = summaries.iter().flat_map(|s| s.disks.iter());
    let mut f = RunFigures {
        agents: summaries.len(),
        wall_s: wall,
        logical_bytes: disk_size * summaries.len() as u64,
        ..Default::default()
    };
    for d in disks {
        f.data_blocks += d.data_blocks;
        f.zero_blocks += d.zero_blocks;
        f.uploaded_blocks += d.uploaded_blocks;
        f.sent_bytes += d.uploaded_bytes;
        f.data_bytes += data_bytes(d.size, d.blocks, d.data_blocks);
        f.stored_bytes += d.stored_bytes;
        f.deduplicated_blocks += d.deduplicated_blocks;
    }
    let secs = wall.max(1e-9);
    let gb = (f.logical_bytes as f64 / 1e9).max(1e-12);
    f.logical_mb_s = f.logical_bytes as f64 / secs / 1e6;
    f.sent_mb_s = f.sent_bytes as f64 / secs / 1e6;
    // Until the server's count is read: what the agents say they uploaded.
    f.wire_bytes = f.sent_bytes;
    f.wire_bytes_source = "agents' upload count".into();
    f.wire_per_data_byte = ratio_of(f.sent_bytes, f.data_bytes);
    f.server_cpu_s = server_cpu_s;
    f.server_cpu_s_per_gb = server_cpu_s.map(|c| c / gb);
    f.agent_cpu_s_per_gb = agent_cpu_s / gb;
    f.latency_p50_ms = percentile(latencies_s, 50.0).map(|s| s * 1e3);
    f.latency_p99_ms = percentile(latencies_s, 99.0).map(|s| s * 1e3);
    f.latency_samples = latencies_s.len();
    f.peak_server_rss_mib = peak_kib.map(|k| k as f64 / 1024.0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protect::DiskSummary;
    use clap::Parser;

    type Wrap = crate::bench::ArgsWrap<IngestArgs>;

    fn args(extra: &[&str]) -> IngestArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Wrap::try_parse_from(v).unwrap().a
    }

    #[test]
    fn defaults_and_argument_checks() {
        let a = args(&[]);
        assert_eq!(a.image.size, 2 << 30);
        assert!(a.distinct, "distinct variants are the default");
        assert_eq!((a.runs, a.agents, a.parallel), (3, 1, 4));
        assert_eq!(a.agents_list, [1, 2, 4, 8]);
        assert!(validate(&a).is_ok());
        assert!(!args(&["--distinct=false"]).distinct);
        assert_eq!(args(&["--warmup-size", "0"]).warmup_size, 0);
        assert_eq!(args(&["--size", "64MiB"]).image.size, 64 << 20);
        assert!(Wrap::try_parse_from(["x", "--size", "lots"]).is_err());
        assert!(
            Wrap::try_parse_from(["x", "--server", "https://h"]).is_err(),
            "needs --creds"
        );
        assert!(Wrap::try_parse_from(["x", "--image", "i.img", "--kind", "zero"]).is_err());
        assert!(Wrap::try_parse_from(["x", "--image", "i.img", "--size", "1G"]).is_err());
        assert!(Wrap::try_parse_from(["x", "--image", "i.img"]).is_ok());
        for bad in [
            &["--agents", "0"][..],
            &["--agents", "256"],
            &["--runs", "0"],
            &["--parallel", "0"],
            &["--plot", "p.png", "--agents-list", "1,0"],
        ] {
            assert!(
                matches!(validate(&args(bad)), Err(BenchError::Invalid(_))),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn run_figures_from_agent_summaries() {
        let disk = |up: u64| DiskSummary {
            data_blocks: 10,
            zero_blocks: 2,
            uploaded_blocks: 10,
            uploaded_bytes: up,
            stored_bytes: up / 2,
            ..Default::default()
        };
        let s = |up| ProtectSummary {
            vm: "v".into(),
            state: "protected".into(),
            disks: vec![disk(up)],
            seconds: 1.0,
        };
        let lat: Vec<f64> = (1..=100).map(|i| i as f64 / 1000.0).collect();
        let f = figures(
            &[s(400_000_000), s(600_000_000)],
            1_000_000_000,
            2.0,
            Some(3.0),
            1.0,
            Some(2048),
            &lat,
        );
        assert_eq!(f.logical_bytes, 2_000_000_000);
        assert_eq!(f.logical_mb_s, 1000.0);
        assert_eq!(f.sent_mb_s, 500.0);
        assert_eq!(f.server_cpu_s_per_gb, Some(1.5));
        assert_eq!(f.agent_cpu_s_per_gb, 0.5);
        assert_eq!((f.data_blocks, f.zero_blocks), (20, 4));
        assert_eq!(f.latency_p50_ms, Some(50.0));
        assert_eq!(f.latency_p99_ms, Some(99.0));
        assert_eq!(f.peak_server_rss_mib, Some(2.0));
    }

    #[test]
    fn wire_bytes_per_data_byte_of_the_data_blocks() {
        // 10 MiB in 3 blocks of 4 MiB: the last one holds 2 MiB.
        assert_eq!(data_bytes(10 << 20, 3, 2), 8 << 20);
        assert_eq!(data_bytes(10 << 20, 3, 3), 10 << 20);
        assert_eq!(data_bytes(64 << 20, 16, 16), 64 << 20);
        assert_eq!(data_bytes(0, 0, 0), 0);
        let s = ProtectSummary {
            vm: "v".into(),
            state: "protected".into(),
            disks: vec![DiskSummary {
                size: 40 << 20,
                blocks: 10,
                data_blocks: 5,
                uploaded_blocks: 5,
                uploaded_bytes: 10 << 20,
                ..Default::default()
            }],
            seconds: 1.0,
        };
        let f = figures(&[s], 40 << 20, 1.0, None, 0.0, None, &[]);
        // Until the server's count is read, the agents' upload count stands for the wire.
        assert_eq!(f.data_bytes, 20 << 20);
        assert_eq!(f.wire_bytes, 10 << 20);
        assert_eq!(f.wire_per_data_byte, Some(0.5));
        assert!(f.wire_bytes_source.contains("agents"));
    }
}
