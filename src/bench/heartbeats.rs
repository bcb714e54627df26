//! `drvault bench heartbeats`: what the server spends on knowing how every host is doing.
//!
//! A fresh server, N registered hosts, each with one protected VM (a small all-zero disk, so
//! protection is quick and the heartbeat answer has a real VM to describe). Then, interleaved
//! so that drift on a shared machine hits both: a window in which every host sends a heartbeat
//! (`POST /v1/agent/heartbeat`, the long-running agent's report) each interval, and an equally
//! long window in which nothing is sent (the baseline: the same server idle, background tasks
//! included). The server's CPU is read from `/proc/PID/stat` before and after each window.
//!
//! Decisions the brief left open:
//! * The figure the issue bounds (under 2% of one core with 100 hosts) is the difference of the
//!   two windows' CPU shares: heartbeats minus idle.
//! * Heartbeats are spread evenly over the interval (host i starts at i/N of it), as agents that
//!   started at different times would be; each host reports its VM with one disk.
//! * The senders run in this process, on the same machine as the server: their own CPU is not
//!   counted (it is the agents' side), and the server's share is what one box does for both.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::procstat::{clock_ticks_per_second, cpu_ticks};
use super::report::{self, Figure};
use super::server::{quick_backoff, SpawnedServer};
use super::{io_err, BenchError};
use crate::agent::protect::{protect, DiskSource, ProtectOptions};
use crate::client::Client;
use crate::wire::{DiskBacklog, Heartbeat, VmReport};

#[derive(clap::Args, Debug, Clone)]
pub struct HeartbeatsArgs {
    /// Simulated hosts, each with one protected VM.
    #[arg(long, default_value_t = 100)]
    pub hosts: usize,
    /// Seconds between one host's heartbeats.
    #[arg(long, default_value_t = 1)]
    pub interval: u64,
    /// Length of each measured window (heartbeats, then idle), in seconds.
    #[arg(long, default_value_t = 20)]
    pub window: u64,
    /// Measured rounds (one heartbeat window and one idle window each); figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Work directory (the server's data lives under it during the run).
    #[arg(long)]
    pub work_dir: Option<std::path::PathBuf>,
    /// Print one JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One round's two windows.
#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatRound {
    /// Server CPU while heartbeats arrive, in % of one core.
    pub busy_cpu_pct: f64,
    /// Server CPU while idle, in % of one core.
    pub idle_cpu_pct: f64,
    pub heartbeats: u64,
    pub heartbeats_per_s: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatsReport {
    pub hosts: usize,
    pub interval_s: u64,
    pub window_s: u64,
    pub load_average: String,
    pub rounds: Vec<HeartbeatRound>,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

pub async fn run(args: HeartbeatsArgs) -> Result<i32, BenchError> {
    if args.runs == 0 || args.hosts == 0 || args.interval == 0 || args.window == 0 {
        return Err(BenchError::Invalid(
            "--runs, --hosts, --interval and --window must be at least 1".into(),
        ));
    }
    let (run_dir, _, server) = super::fresh_run(args.work_dir.as_deref(), "heartbeats").await?;
    let result = measure(&server, &args, &run_dir).await;
    let stopped = server.stop().await;
    let _ = std::fs::remove_dir_all(&run_dir);
    let rounds = result?;
    stopped?;
    let r = build(&args, rounds);
    if args.json {
        println!("{}", report::json(&r)?);
    } else {
        let heading = vec![
            format!(
                "drvault bench heartbeats: {} hosts, one heartbeat each every {} s, windows of {} s",
                r.hosts, r.interval_s, r.window_s
            ),
            format!("load average at start: {}", r.load_average),
        ];
        print!("{}", report::figures_table(&heading, &r.figures, &r.notes));
    }
    Ok(0)
}

fn build(args: &HeartbeatsArgs, rounds: Vec<HeartbeatRound>) -> HeartbeatsReport {
    let busy: Vec<f64> = rounds.iter().map(|r| r.busy_cpu_pct).collect();
    let idle: Vec<Option<f64>> = rounds.iter().map(|r| Some(r.idle_cpu_pct)).collect();
    let share: Vec<f64> = rounds
        .iter()
        .map(|r| (r.busy_cpu_pct - r.idle_cpu_pct).max(0.0))
        .collect();
    let rate: Vec<f64> = rounds.iter().map(|r| r.heartbeats_per_s).collect();
    let p50: Vec<f64> = rounds.iter().filter_map(|r| r.latency_p50_ms).collect();
    let p99: Vec<f64> = rounds.iter().filter_map(|r| r.latency_p99_ms).collect();
    let errors: u64 = rounds.iter().map(|r| r.errors).sum();
    let figures = vec![
        Figure::new(
            "server CPU, % of one core",
            &busy,
            &idle,
            "same server idle",
        ),
        Figure::alone("heartbeat share, % of one core", &share),
        Figure::alone("heartbeats/s", &rate),
        Figure::alone("heartbeat latency p50 ms", &p50),
        Figure::alone("heartbeat latency p99 ms", &p99),
    ];
    let mut notes = vec![format!(
        "heartbeat share = server CPU with heartbeats minus idle; the issue's bound is 2% of one core for 100 hosts at 1 s"
    )];
    if errors > 0 {
        notes.push(format!("{errors} heartbeat(s) failed"));
    }
    HeartbeatsReport {
        hosts: args.hosts,
        interval_s: args.interval,
        window_s: args.window,
        load_average: super::load_average(),
        rounds,
        figures,
        notes,
    }
}

/// A simulated host: its client and the heartbeat it sends.
struct SimHost {
    client: Client,
    beat: Heartbeat,
}

async fn measure(
    server: &SpawnedServer,
    args: &HeartbeatsArgs,
    run_dir: &Path,
) -> Result<Vec<HeartbeatRound>, BenchError> {
    let disk = run_dir.join("zero.raw");
    let f = std::fs::File::create(&disk).map_err(io_err("creating", &disk))?;
    f.set_len(4 << 20).map_err(io_err("sizing", &disk))?;
    let mut hosts = Vec::with_capacity(args.hosts);
    for i in 0..args.hosts {
        let name = format!("hb{i:04}");
        let creds = server.add_host(&name).await?;
        let client = crate::agent::client_for(&creds, None).map_err(|e| BenchError::Agent {
            vm: name.clone(),
            source: Box::new(e),
        })?;
        let vm = format!("{name}-vm");
        let image: Arc<dyn crate::format::image::DiskImage> =
            Arc::from(crate::format::image::open(&disk)?);
        let source = DiskSource {
            id: "disk0".into(),
            path: disk.clone(),
            image,
        };
        let opts = ProtectOptions {
            vm: vm.clone(),
            generation: 2,
            cpus: 1,
            memory_mib: 512,
            nics: Vec::new(),
            policy: None,
            parallel: 1,
            backoff: quick_backoff(),
            progress: false,
            upload_latencies: None,
            throttle: None,
        };
        protect(&client, std::slice::from_ref(&source), &opts)
            .await
            .map_err(|e| BenchError::Agent {
                vm: vm.clone(),
                source: Box::new(e),
            })?;
        let beat = Heartbeat {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            interval_s: args.interval,
            vms: vec![VmReport {
                vm,
                replicating: true,
                disks: vec![DiskBacklog {
                    disk: "disk0".into(),
                    backlog_bytes: 0,
                    pending_logs: 0,
                    oldest_pending_unix: None,
                }],
                last_error: None,
                last_cycle_unix: Some(crate::util::unix_now()),
            }],
        };
        hosts.push(Arc::new(SimHost { client, beat }));
    }
    let pid = server.pid.to_string();
    let tick = clock_ticks_per_second() as f64;
    let window = Duration::from_secs(args.window);
    let mut rounds = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let before = cpu_ticks(&pid)?.own;
        let t0 = Instant::now();
        let (latencies, errors) = beat_for(&hosts, args.interval, window).await;
        let busy_s = t0.elapsed().as_secs_f64();
        let busy_ticks = cpu_ticks(&pid)?.own.saturating_sub(before);

        let before = cpu_ticks(&pid)?.own;
        let t1 = Instant::now();
        tokio::time::sleep(window).await;
        let idle_s = t1.elapsed().as_secs_f64();
        let idle_ticks = cpu_ticks(&pid)?.own.saturating_sub(before);

        let n = latencies.len() as u64;
        rounds.push(HeartbeatRound {
            busy_cpu_pct: busy_ticks as f64 / tick / busy_s * 100.0,
            idle_cpu_pct: idle_ticks as f64 / tick / idle_s * 100.0,
            heartbeats: n,
            heartbeats_per_s: n as f64 / busy_s,
            latency_p50_ms: super::percentile(&latencies, 50.0),
            latency_p99_ms: super::percentile(&latencies, 99.0),
            errors,
        });
    }
    Ok(rounds)
}

/// Every host sends a heartbeat each `interval_s`, staggered over the interval, for `window`.
/// Returns the latencies (ms) of the successful ones and the number that failed.
async fn beat_for(hosts: &[Arc<SimHost>], interval_s: u64, window: Duration) -> (Vec<f64>, u64) {
    let interval = Duration::from_secs(interval_s);
    let end = Instant::now() + window;
    let n = hosts.len() as u32;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, h) in hosts.iter().enumerate() {
        let h = h.clone();
        let offset = interval * i as u32 / n;
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut next = Instant::now() + offset;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let t = Instant::now();
                match h.client.heartbeat(&h.beat).await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        if errors == 0 {
                            tracing::warn!(error = %e, "heartbeat failed");
                        }
                        errors += 1;
                    }
                }
                next += interval;
            }
            (lat, errors)
        });
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        if let Ok((l, e)) = r {
            all.extend(l);
            errors += e;
        }
    }
    (all, errors)
}
