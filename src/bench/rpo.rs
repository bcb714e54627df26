//! `drvault bench rpo`: the recovery point objective a long-running agent really achieves.
//!
//! A fresh server, one host, and `drvault agent run` (a child process, as on a real host)
//! protecting N VMs with the image-diff source at the given interval. A writer per VM changes
//! its raw image at the given rate for the measured duration and, every 100 ms, stamps block 0
//! with a sequence number. A watcher per VM lists the VM's points every 100 ms; for each new
//! point it reads block 0 at that point and takes the highest stamp it holds. A stamp's RPO is
//! the time from writing it to seeing the first point that contains it: the data loss a
//! failover at that moment would have meant, measured from outside, with the watcher's 100 ms
//! polling as the resolution.
//!
//! Decisions the brief left open:
//! * The baseline is the replication interval itself: interval-based replication cannot do
//!   better than a point per interval, so the ratio says how much the pipeline (read the image,
//!   write the log, send, accept, publish the point) adds to the interval.
//! * The image-diff source reads every image whole each cycle (the cost a host without change
//!   tracking pays); images are therefore small by default (64 MiB). A spool source with a
//!   real change tracker reads nothing.
//! * Writes are 64 KiB-aligned runs of random data at random places (never block 0, the stamp's
//!   block), `rate` bytes per second per VM in ten slices a second.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::images::WyRand;
use super::report::{self, Figure};
use super::server::SpawnedServer;
use super::{io_err, BenchError};
use crate::client::Client;

const STAMP_MAGIC: &[u8; 8] = b"DRVRPO01";
const SLICE: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug, Clone)]
pub struct RpoArgs {
    /// VMs the one agent protects.
    #[arg(long, default_value_t = 3)]
    pub vms: usize,
    /// Replication interval of every VM's policy, in seconds.
    #[arg(long, default_value_t = 1)]
    pub interval: u64,
    /// Bytes each VM's writer changes per second (e.g. 10MB).
    #[arg(long, default_value = "10MB", value_parser = super::parse_size_arg)]
    pub rate: u64,
    /// Size of each VM's disk.
    #[arg(long, default_value = "64MiB", value_parser = super::parse_size_arg)]
    pub disk_size: u64,
    /// Measured seconds of writing.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Work directory (images, the server's data and the agent's state live under it).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Print one JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RpoReport {
    pub vms: usize,
    pub interval_s: u64,
    pub rate_bytes_per_s: u64,
    pub duration_s: u64,
    pub load_average: String,
    pub samples: usize,
    /// Stamps written that no point showed before the end.
    pub unseen: usize,
    pub points_seen: usize,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

pub async fn run(args: RpoArgs) -> Result<i32, BenchError> {
    if args.vms == 0 || args.interval == 0 || args.duration == 0 {
        return Err(BenchError::Invalid(
            "--vms, --interval and --duration must be at least 1".into(),
        ));
    }
    if args.disk_size < (8 << 20) {
        return Err(BenchError::Invalid(
            "--disk-size must be at least 8MiB".into(),
        ));
    }
    let load_average = super::load_average();
    let (run_dir, exe, server) = super::fresh_run(args.work_dir.as_deref(), "rpo").await?;
    let result = measure(&server, &exe, &args, &run_dir).await;
    let stopped = server.stop().await;
    let kept = result.is_err();
    if !kept {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    let (samples, unseen, points_seen) = result
        .map_err(|e| BenchError::Invalid(format!("{e} (logs kept in {})", run_dir.display())))?;
    stopped?;
    let interval = args.interval as f64;
    let p50 = super::percentile(&samples, 50.0);
    let p99 = super::percentile(&samples, 99.0);
    let figures = vec![
        Figure::new(
            "RPO p50 s",
            &p50.into_iter().collect::<Vec<_>>(),
            &[Some(interval)],
            "the policy interval",
        ),
        Figure::new(
            "RPO p99 s",
            &p99.into_iter().collect::<Vec<_>>(),
            &[Some(interval)],
            "the policy interval",
        ),
        Figure::alone(
            "RPO max s",
            &samples
                .iter()
                .copied()
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                .into_iter()
                .collect::<Vec<_>>(),
        ),
    ];
    let mut notes = vec![format!(
        "RPO of a stamp = time from writing it to seeing the first point holding it (100 ms polling); {} stamps, {} points",
        samples.len(),
        points_seen
    )];
    if unseen > 0 {
        notes.push(format!(
            "{unseen} stamp(s) written in the last moments were in no point before the end"
        ));
    }
    let r = RpoReport {
        vms: args.vms,
        interval_s: args.interval,
        rate_bytes_per_s: args.rate,
        duration_s: args.duration,
        load_average,
        samples: samples.len(),
        unseen,
        points_seen,
        figures,
        notes,
    };
    if args.json {
        println!("{}", report::json(&r)?);
    } else {
        let heading = vec![
            format!(
                "drvault bench rpo: {} VM(s) on one `agent run`, interval {} s, {:.1} MB/s written per VM, {} s",
                r.vms,
                r.interval_s,
                r.rate_bytes_per_s as f64 / 1e6,
                r.duration_s
            ),
            format!("load average at start: {}", r.load_average),
        ];
        print!("{}", report::figures_table(&heading, &r.figures, &r.notes));
    }
    Ok(0)
}

/// The stamps a writer wrote: sequence number → when.
type Stamps = Arc<Mutex<Vec<Instant>>>;

async fn measure(
    server: &SpawnedServer,
    exe: &Path,
    args: &RpoArgs,
    run_dir: &Path,
) -> Result<(Vec<f64>, usize, usize), BenchError> {
    let creds = server.add_host("rpo-host").await?;
    let creds_path = run_dir.join("host.creds.json");
    let text = serde_json::to_string(&creds)
        .map_err(|e| BenchError::Invalid(format!("credentials: {e}")))?;
    write_private(&creds_path, &text)?;
    let names: Vec<String> = (0..args.vms).map(|i| format!("rpo{i:02}")).collect();
    let mut toml = format!(
        "creds = {:?}\nstate_dir = {:?}\nheartbeat_s = {}\n",
        creds_path.display().to_string(),
        run_dir.join("agent-state").display().to_string(),
        args.interval
    );
    for n in &names {
        let img = run_dir.join(format!("{n}.raw"));
        let f = std::fs::File::create(&img).map_err(io_err("creating", &img))?;
        f.set_len(args.disk_size).map_err(io_err("sizing", &img))?;
        toml.push_str(&format!(
            "\n[[vm]]\nname = {n:?}\ninterval_s = {}\nretention_s = 3600\napp_consistent_every_s = 0\n\n  [[vm.disk]]\n  id = \"disk0\"\n  path = {:?}\n  format = \"raw\"\n  source = \"image-diff\"\n",
            args.interval,
            img.display().to_string()
        ));
    }
    let config = run_dir.join("agent.toml");
    std::fs::write(&config, toml).map_err(io_err("writing", &config))?;
    let log = run_dir.join("agent.log");
    let out = std::fs::File::create(&log).map_err(io_err("creating", &log))?;
    let err = out.try_clone().map_err(io_err("opening", &log))?;
    let mut agent = tokio::process::Command::new(exe)
        .arg("agent")
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BenchError::Invalid(format!("cannot start the agent: {e}")))?;
    let op = server.operator()?;
    // Protection first (initial replication of zero disks is quick).
    let deadline = Instant::now() + Duration::from_secs(120);
    for n in &names {
        loop {
            if let Ok(v) = op.vm(n).await {
                if v.state == crate::wire::VmState::Protected {
                    break;
                }
            }
            if let Ok(Some(st)) = agent.try_wait() {
                return Err(BenchError::Invalid(format!(
                    "the agent exited ({st}) before protecting {n}: {}",
                    super::server::log_tail(&log)
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Invalid(format!(
                    "{n} not protected after 120 s: {}",
                    super::server::log_tail(&log)
                )));
            }
            tokio::time::sleep(SLICE).await;
        }
    }
    let end = Instant::now() + Duration::from_secs(args.duration);
    let mut writers = tokio::task::JoinSet::new();
    let mut watchers = tokio::task::JoinSet::new();
    for (i, n) in names.iter().enumerate() {
        let stamps: Stamps = Arc::new(Mutex::new(Vec::new()));
        let img = run_dir.join(format!("{n}.raw"));
        let (size, rate) = (args.disk_size, args.rate);
        let s2 = stamps.clone();
        writers.spawn(async move { write_loop(img, size, rate, i as u64, s2, end).await });
        let (op, vm) = (op.clone(), n.clone());
        // Watch a little past the end so the last stamps can land.
        let watch_end = end + Duration::from_secs(args.interval * 3 + 5);
        watchers.spawn(async move { watch(op, vm, stamps, watch_end).await });
    }
    while let Some(r) = writers.join_next().await {
        r.map_err(|e| BenchError::Invalid(format!("writer stopped: {e}")))??;
    }
    let (mut samples, mut unseen, mut points) = (Vec::new(), 0, 0);
    while let Some(r) = watchers.join_next().await {
        let (s, u, p) = r.map_err(|e| BenchError::Invalid(format!("watcher stopped: {e}")))??;
        samples.extend(s);
        unseen += u;
        points += p;
    }
    if let Some(pid) = agent.id() {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), agent.wait()).await;
    Ok((samples, unseen, points))
}

fn write_private(path: &Path, text: &str) -> Result<(), BenchError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(text.as_bytes())
        .map_err(io_err("writing", path))
}

/// Writes `rate` bytes a second in ten slices, then the stamp, until `end`.
async fn write_loop(
    img: PathBuf,
    size: u64,
    rate: u64,
    seed: u64,
    stamps: Stamps,
    end: Instant,
) -> Result<(), BenchError> {
    let per_slice = (rate / 10).max(4096);
    let mut next = Instant::now();
    let mut rng = WyRand::new(0x5250_4f00 + seed);
    while Instant::now() < end {
        let img2 = img.clone();
        let seq = stamps.lock().map(|s| s.len() as u64).unwrap_or(0);
        let mut r = WyRand::new(rng.next_u64());
        let at = tokio::task::spawn_blocking(move || -> Result<Instant, BenchError> {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&img2)
                .map_err(io_err("opening", &img2))?;
            let run = 64 * 1024u64;
            let runs = (size / run).saturating_sub(64).max(1);
            let mut buf = vec![0u8; run as usize];
            let mut left = per_slice;
            while left > 0 {
                // Past the first 4 MiB: block 0 holds only the stamp.
                let off = (64 + r.next_u64() % runs) * run;
                let n = left.min(run) as usize;
                let chunk = &mut buf[..n];
                r.fill(chunk);
                f.write_all_at(chunk, off)
                    .map_err(io_err("writing", &img2))?;
                left -= n as u64;
            }
            let mut stamp = [0u8; 4096];
            stamp[..8].copy_from_slice(STAMP_MAGIC);
            stamp[8..16].copy_from_slice(&(seq + 1).to_le_bytes());
            f.write_all_at(&stamp, 0)
                .map_err(io_err("writing", &img2))?;
            Ok(Instant::now())
        })
        .await
        .map_err(|e| BenchError::Invalid(format!("write stopped: {e}")))??;
        if let Ok(mut s) = stamps.lock() {
            s.push(at);
        }
        next += SLICE;
        tokio::time::sleep_until(next.into()).await;
    }
    Ok(())
}

/// Lists points until `end`; for each new one reads its stamp. Returns the RPO of every stamp
/// seen (s), the number of stamps never seen, and the number of points read.
async fn watch(
    op: Client,
    vm: String,
    stamps: Stamps,
    end: Instant,
) -> Result<(Vec<f64>, usize, usize), BenchError> {
    let mut seen_points = std::collections::HashSet::new();
    let mut covered = 0u64;
    let mut samples = Vec::new();
    while Instant::now() < end {
        let points = op.points(&vm).await?;
        for p in points {
            if p.kind == "incomplete" || !seen_points.insert(p.id.clone()) {
                continue;
            }
            let block = op.block(&vm, "disk0", 0, Some(&p.id)).await?;
            let b = &block.bytes;
            if b.len() < 16 || b.get(..8) != Some(STAMP_MAGIC.as_slice()) {
                continue;
            }
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&b[8..16]);
            let seq = u64::from_le_bytes(seq);
            let now = Instant::now();
            if seq > covered {
                let written = stamps.lock().map(|s| s.clone()).unwrap_or_default();
                for at in written.iter().take(seq as usize).skip(covered as usize) {
                    samples.push(now.duration_since(*at).as_secs_f64());
                }
                covered = seq;
            }
        }
        tokio::time::sleep(SLICE).await;
    }
    let written = stamps.lock().map(|s| s.len()).unwrap_or(0) as u64;
    Ok((
        samples,
        written.saturating_sub(covered) as usize,
        seen_points.len(),
    ))
}
