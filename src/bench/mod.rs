//! `drvault bench`: the benchmark harness. `drvault bench ingest` replicates a disk image with N
//! concurrent reference agents against a real server and reports what an operator sizing a
//! deployment wants to know, next to same-run baselines on the same image:
//!
//! | figure                  | how it is measured                                              |
//! |-------------------------|-----------------------------------------------------------------|
//! | logical MB/s            | disk bytes of all agents / wall time from first request to last |
//! | MB/s sent               | data-block bytes uploaded (zero blocks are never sent) / wall   |
//! | server CPU s/GB         | utime+stime of the server process (`/proc/PID/stat`) per logical GB |
//! | latency p50/p99         | each block PUT timed by the agent (retries included)            |
//! | peak server RSS         | `VmHWM` of the server process (a fresh one per run)             |
//! | agent CPU s/GB          | this process's own CPU (all agents) per logical GB              |
//!
//! Baselines, run in the same invocation on the same image, interleaved with our runs so that
//! drift in a shared machine hits both: (a) the in-process block pipeline (read, zero check,
//! hash, compress, seal, fsynced put into a fresh `file://` store, 2 CPU threads): the ceiling
//! the server could reach without HTTP, TLS and the agent; (b) `cp` of the image plus an fsync
//! of the copy, with the source in the page cache; (c) `restic backup` of the image into a fresh
//! local repository (format 2, so it compresses like we do); (d) `borg create --compression
//! zstd,3` into a fresh encrypted (repokey) repository. Ratios are ours / baseline.
//!
//! `drvault bench heartbeats` ([`heartbeats`]) measures the server's CPU for agents' heartbeats,
//! `drvault bench rpo` ([`rpo`]) the RPO a long-running agent achieves.
//!
//! `drvault bench deltas` ([`deltas`]) and `drvault bench failover` ([`failover`]) report in
//! one row form, figure | ours | baseline | ratio ([`report::Figure`]), with the same `--json`,
//! spawned-or-existing server ([`server`]) and generated images ([`images`]).
//!
//! Decisions the brief left open:
//! * MB is 10^6 bytes in every rate; sizes on the command line are binary (`2GiB`, `2G`) unless
//!   written with an SI unit (`2GB`), see [`parse_size`].
//! * Every measured run starts its own server on a fresh data directory (deleted afterwards),
//!   so runs do not deduplicate against each other and the peak RSS belongs to that run alone.
//! * `--distinct` (the default) makes every agent's copy of the image differ (see
//!   [`images::DistinctImage`]): N agents protecting identical disks would otherwise be
//!   deduplicated by the server after the first, and the figure would flatter us.
//! * The agents run inside this process and share the machine with the server: on a small
//!   machine the figure is what one box can do for both sides, and the agent CPU is reported
//!   so the split can be seen.
//! * A missing `restic` or `borg` is reported as missing (`apt-get install restic
//!   borgbackup`); the harness does not install software itself.

pub mod baselines;
pub mod boot;
pub mod changes;
pub mod deltas;
pub mod failover;
pub mod heartbeats;
pub mod images;
pub mod ingest;
pub mod page_blobs;
pub mod procstat;
pub mod report;
pub mod resync;
pub mod rpo;
pub mod scale;
pub mod server;
pub mod sparse;

use std::path::PathBuf;

use crate::agent::AgentError;
use crate::client::ClientError;

/// Subcommands of `drvault bench`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchCmd {
    /// Replicate a disk image with N concurrent agents against a server and report throughput,
    /// latency, server CPU and memory next to same-run baselines (pipeline, cp, restic, borg).
    Ingest(ingest::IngestArgs),
    /// Send MS-HRL logs of scattered 4 KiB writes and of 256 KiB extents to a protected disk and
    /// report acknowledgement MB/s, time to the recovery point, merge MB/s and export time with
    /// a long journal against a merged one, next to same-run baselines (pipeline, cp, hrl apply).
    Deltas(deltas::DeltasArgs),
    /// Protect an image, run test failovers and report materialization MB/s against
    /// `qemu-img convert -O vpc -o subformat=fixed` of the same raw image in the same run.
    Failover(failover::FailoverArgs),
    /// Protect an image, change it without logs (a broken chain), resynchronize it and report
    /// time and bytes on the wire against `rsync --no-whole-file --inplace` of the same files.
    Resync(resync::ResyncArgs),
    /// Register N hosts with a protected VM each, send the long-running agent's heartbeat from
    /// every host each interval, and report the server's CPU against the same server idle.
    Heartbeats(heartbeats::HeartbeatsArgs),
    /// Run `drvault agent run` over N VMs whose disks a writer changes continuously, and report
    /// the RPO (time from a write to the first point holding it), p50 and p99, against the
    /// policy interval.
    Rpo(rpo::RpoArgs),
    /// Several servers on one vault (file://, Azurite or moto S3): aggregate ingest and server
    /// CPU per GB with 1, 2 and 3 servers, 64 agents spread over 3 servers against 16 on one,
    /// and the time from a server's death to its VMs replicating again.
    Scale(scale::ScaleArgs),
}

/// Errors of the harness, with what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("size {input:?}: {reason}")]
    Size { input: String, reason: &'static str },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },
    #[error("server: {0}")]
    Server(String),
    #[error("/proc: {0}")]
    Proc(String),
    #[error("agent {vm}: {source}")]
    Agent { vm: String, source: Box<AgentError> },
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("pipeline baseline: {0}")]
    Chunk(#[from] crate::chunk::pipeline::ChunkError),
    #[error("pipeline baseline store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Image(#[from] crate::format::image::ImageError),
    #[error("writing a change log: {0}")]
    Hrl(#[from] crate::format::hrl::HrlError),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> BenchError + 'a {
    move |source| BenchError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Runs a `drvault bench` subcommand; returns the process exit code.
pub async fn run(cmd: BenchCmd) -> Result<i32, BenchError> {
    match cmd {
        BenchCmd::Ingest(args) => ingest::run(args).await,
        BenchCmd::Deltas(args) => deltas::run(args).await,
        BenchCmd::Failover(args) => failover::run(args).await,
        BenchCmd::Resync(args) => resync::run(args).await,
        BenchCmd::Heartbeats(args) => heartbeats::run(args).await,
        BenchCmd::Rpo(args) => rpo::run(args).await,
        BenchCmd::Scale(args) => scale::run(args).await,
    }
}

/// Parses a human size: a number (fraction allowed) and an optional unit. `K`, `M`, `G`, `T`
/// with or without `iB` are binary (1024^n, as mkfs and dd read them); `KB`, `MB`, `GB`, `TB`
/// are SI (1000^n); `B` or nothing means bytes. Case-insensitive. A fraction must come out as a
/// whole number of bytes.
pub fn parse_size(input: &str) -> Result<u64, BenchError> {
    let err = |reason| BenchError::Size {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err("expected a number, e.g. 2GiB, 512M, 1073741824"));
    }
    let mult: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(err(
                "unknown unit (use B, KiB, MiB, GiB, TiB, K, M, G, T, KB, MB, GB, TB)",
            ))
        }
    };
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac_part.contains('.') || (int_part.is_empty() && frac_part.is_empty()) {
        return Err(err("malformed number"));
    }
    // Digits only from here on; 30 digits cannot overflow u128 once multiplied below.
    if int_part.len() + frac_part.len() > 30 {
        return Err(err("number too long"));
    }
    let parse = |d: &str| -> u128 {
        d.bytes()
            .fold(0u128, |acc, b| acc * 10 + u128::from(b - b'0'))
    };
    let scale = 10u128.pow(frac_part.len() as u32);
    let scaled = (parse(int_part) * scale + parse(frac_part)) * mult;
    if scaled % scale != 0 {
        return Err(err("not a whole number of bytes"));
    }
    let bytes = u64::try_from(scaled / scale).map_err(|_| err("too large"))?;
    if bytes == 0 {
        return Err(err("must not be zero"));
    }
    Ok(bytes)
}

/// clap value parser for sizes.
pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Nearest-rank percentile (`p` in 0..=100) of `values`; None when empty. NaNs sort last.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    // Rank ceil(p/100 * n), 1-based; p = 0 is the minimum.
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

/// Median (mean of the two middle values for an even count); None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let hi = v.get(n / 2).copied()?;
    if n % 2 == 1 {
        return Some(hi);
    }
    let lo = v.get(n / 2 - 1).copied()?;
    Some((lo + hi) / 2.0)
}

/// Median over the runs that produced the figure (e.g. restic present in every run).
pub fn median_of<T>(items: &[T], f: impl Fn(&T) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = items.iter().filter_map(f).collect();
    median(&v)
}

/// The default work directory: stable across invocations so generated images are reused.
pub fn default_work_dir() -> PathBuf {
    std::env::temp_dir().join("drvault-bench")
}

/// The 1, 5 and 15 minute load averages, as printed with every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The note every report carries: the machine's load when the measurement started and ended
/// (ratios hold on a loaded machine, absolute rates do not).
pub fn load_note(at_start: &str) -> String {
    format!(
        "load average (1, 5, 15 min) at start {at_start}, at end {}",
        load_average()
    )
}

/// An empty `runs/NAME` under the work directory (default [`default_work_dir`]), this binary's
/// path, and a server spawned on a fresh data directory there.
pub(crate) async fn fresh_run(
    work_dir: Option<&std::path::Path>,
    name: &str,
) -> Result<(PathBuf, PathBuf, server::SpawnedServer), BenchError> {
    let work = work_dir.map_or_else(default_work_dir, std::path::Path::to_path_buf);
    let run_dir = work.join("runs").join(name);
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(io_err("creating", &run_dir))?;
    let exe =
        std::env::current_exe().map_err(io_err("locating", std::path::Path::new("this binary")))?;
    let server = server::SpawnedServer::start(
        &exe,
        &run_dir.join("data"),
        &run_dir.join("server.log"),
        None,
    )
    .await?;
    Ok((run_dir, exe, server))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_binary_and_si_units() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("64 M").unwrap(), 64 << 20);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size(".5M").unwrap(), 512 << 10);
        assert_eq!(parse_size("1073741824").unwrap(), 1 << 30);
        assert_eq!(parse_size("512B").unwrap(), 512);
        assert_eq!(parse_size(" 3MiB ").unwrap(), 3 << 20);
    }

    #[test]
    fn bad_sizes_are_refused_with_the_reason() {
        let reason = |s: &str| match parse_size(s) {
            Err(BenchError::Size { reason, .. }) => reason,
            other => panic!("{s}: expected a size error, got {other:?}"),
        };
        assert!(reason("").contains("expected a number"));
        assert!(reason("GiB").contains("expected a number"));
        assert!(reason("2XB").contains("unknown unit"));
        assert!(reason("2 GiB x").contains("unknown unit"));
        assert!(reason("1.2.3G").contains("malformed"));
        assert!(reason(".").contains("malformed"));
        assert!(reason("0").contains("zero"));
        assert!(reason("0.1B").contains("whole number"));
        assert!(reason("20000000TiB").contains("too large"));
        assert!(reason("1234567890123456789012345678901").contains("too long"));
        assert!(reason("-1G").contains("expected a number"));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        // Unsorted input and a small sample: p99 of 3 values is the largest.
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[7.5], 50.0), Some(7.5));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&v, 101.0), None);
        assert_eq!(percentile(&v, -1.0), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let runs = [Some(1.0), None, Some(3.0)];
        assert_eq!(median_of(&runs, |x| *x), Some(2.0));
        assert_eq!(median_of(&[None::<f64>], |x| *x), None);
    }
}

/// A bench subcommand's flags as a whole command line, for tests of their parsing.
#[cfg(test)]
#[derive(clap::Parser)]
pub(crate) struct ArgsWrap<A: clap::Args> {
    #[command(flatten)]
    pub a: A,
}
