//! The `drvault` command line: one binary for the server, the operator tools, the reference
//! agent and the benchmark harness. Every operator and agent command is a client of the HTTPS
//! API; nothing here reaches into the vault directly.

pub mod hrl;
pub mod key;
pub mod operator;
pub mod resync;
pub mod scrub;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use reqwest::Method;

use crate::agent::backoff::Backoff;
use crate::catalog::{NicSpec, Policy, VmView};
use crate::format::image::SourceFormat;
use operator::Conn;

#[derive(Parser)]
#[command(
    name = "drvault",
    version,
    about = "Disaster-recovery vault for Hyper-V replication: sealed storage, change-log journal, failover to fixed VHD",
    long_about = "drvault receives virtual disks and Hyper-V Replica change logs from host agents over HTTPS, \
keeps them compressed and AES-256-GCM-encrypted in an object store (a local directory, Azure Blob or S3), \
and materializes bootable fixed VHD disks on failover.\n\n\
Start a server:            drvault serve\n\
Register a host:           drvault host add hv01\n\
Protect a VM (on the host): drvault agent protect --creds hv01.creds.json --vm web01 --disk web01.vhdx\n\
Read a disk back:          drvault export --vm web01 --disk web01 --format vhd -o web01.vhd"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (HTTPS). With no config it creates ./drvault-data with a local vault, a
    /// master key, a self-signed certificate and an operator token, and listens on 127.0.0.1:8443.
    Serve {
        /// TOML configuration (see config/drvault.example.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides server.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides server.listen (e.g. 127.0.0.1:0 for any free port: the CLI finds it in
        /// <data-dir>/server.json).
        #[arg(long, env = "DRVAULT_LISTEN")]
        listen: Option<String>,
    },
    /// Check that the server answers (operator); --wait retries until it does, for scripts
    /// that start `drvault serve &` and go on at once.
    Status {
        /// Keep trying this long (e.g. 30s) while the server is starting.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register, list and remove Hyper-V hosts (operator).
    Host {
        #[command(subcommand)]
        cmd: HostCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register, list and remove VMM-style providers that act for every host of a cloud (operator).
    Provider {
        #[command(subcommand)]
        cmd: ProviderCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// List protected VMs with state and health (operator).
    Vms {
        /// One VM in detail.
        name: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List jobs, newest first, or show one; `jobs resume ID` continues a paused job (operator).
    #[command(args_conflicts_with_subcommands = true)]
    Jobs {
        #[command(subcommand)]
        cmd: Option<JobsCmd>,
        /// A job id to show in detail.
        id: Option<String>,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a replicated disk as a fixed VHD or raw image, verifying every block (operator).
    Export {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: String,
        #[arg(long, value_parser = ["vhd", "raw"], default_value = "vhd")]
        format: String,
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Recovery point: latest, latest-app, c<cycle>, or an RFC 3339 time (the latest point at
        /// or before it). Default: the replica's base (initial replication or last merge).
        #[arg(long)]
        point: Option<String>,
        /// Blocks fetched in parallel.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change a protected VM's replication policy (operator).
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Fail a VM over to a recovery point (test, planned, unplanned), or clean up, commit, show.
    #[command(args_conflicts_with_subcommands = true)]
    Failover {
        #[command(subcommand)]
        cmd: Option<FailoverCmd>,
        #[command(flatten)]
        start: FailoverStart,
        #[command(flatten)]
        conn: Conn,
    },
    /// Recovery plans: groups of VMs failed over in order (operator).
    Plan {
        #[command(subcommand)]
        cmd: PlanCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// List a VM's recovery points (operator).
    Points {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Resynchronize a VM's disks (compare checksums, send only differences): start a session,
    /// --status, or --cancel (operator). Logs pause while a session is open.
    Resync(resync::ResyncArgs),
    /// After a committed failover: show or commit the failback to on-premises (operator).
    Failback {
        #[command(subcommand)]
        cmd: resync::FailbackCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Merge logs that left the retention window into the replica now (operator).
    Merge {
        #[arg(long)]
        vm: String,
        /// Merge every log, keeping only the latest point.
        #[arg(long)]
        all: bool,
        /// Merge every log up to and including this point (e.g. c12).
        #[arg(long)]
        through: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Re-read the vault's objects and check them (tag, hash); quarantine what is damaged and
    /// mark the recovery points that need it (operator). Exit status 2 when damage was found.
    Verify(scrub::VerifyArgs),
    /// Delete objects no retained point or open session references, older than the grace
    /// period (operator). Safe while agents upload.
    Gc(scrub::GcArgs),
    /// Make, read and apply MS-HRL change logs (no server needed).
    Hrl {
        #[command(subcommand)]
        cmd: HrlCmd,
    },
    /// The reference host agent.
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
    },
    /// The vault's encryption keys: list them, rotate to a new one (operator).
    Key {
        #[command(subcommand)]
        cmd: key::KeyCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Measure ingest throughput, latency and server cost against same-run baselines.
    Bench {
        #[command(subcommand)]
        cmd: crate::bench::BenchCmd,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Register a host and write its credentials file (server URL, host token, CA certificate).
    Add {
        name: String,
        /// Put the host in a VMM cloud (its provider may then act for it).
        #[arg(long)]
        cloud: Option<String>,
        /// Credentials file to write (default NAME.creds.json).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// List hosts and the VMs each protects.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a host: its token stops working at once.
    Remove { name: String },
}

#[derive(Subcommand)]
enum ProviderCmd {
    /// Register a provider for a cloud and write its credentials file.
    Add {
        name: String,
        #[arg(long)]
        cloud: String,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Remove {
        name: String,
    },
}

#[derive(clap::Args, Clone)]
struct AgentConn {
    /// Credentials file from `drvault host add` or `drvault provider add`.
    #[arg(long)]
    creds: PathBuf,
    /// With provider credentials: the host to act for.
    #[arg(long)]
    host: Option<String>,
    /// Multiplies every back-off wait (1, 2, 4, 8, 10 then 30 minutes); e.g. 0.01 in tests.
    #[arg(long, env = "DRVAULT_BACKOFF_SCALE", default_value_t = 1.0)]
    backoff_scale: f64,
    /// Give up retrying recoverable errors after this long (e.g. 30s, 2h).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    give_up_after: Duration,
}

#[derive(Subcommand)]
enum JobsCmd {
    /// Continue a job waiting for a manual action (a recovery plan pause).
    Resume { id: String },
}

#[derive(Subcommand)]
enum PlanCmd {
    /// Create a plan: --group VM,VM --group VM … (groups fail over in this order).
    Create {
        name: String,
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
        /// N:COMMAND run before group N (1-based); a failure stops the plan.
        #[arg(long = "pre")]
        pre: Vec<String>,
        /// N:COMMAND run after group N.
        #[arg(long = "post")]
        post: Vec<String>,
        /// Pause before group N for a manual action (`drvault jobs resume ID`).
        #[arg(long = "pause")]
        pause: Vec<usize>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct FailoverStart {
    #[arg(long)]
    vm: Option<String>,
    /// Fail over a recovery plan instead of one VM (--point latest-common: the latest cycle
    /// every VM of the plan has).
    #[arg(long, conflicts_with = "vm")]
    plan: Option<String>,
    /// test (drill on the test network, VM keeps replicating), planned (waits for every disk's
    /// --final log: no data loss), unplanned (latest point now, or --point).
    #[arg(long, value_parser = ["test", "planned", "unplanned"])]
    kind: Option<String>,
    /// latest, latest-app, c<cycle>, or an RFC 3339 time.
    #[arg(long)]
    point: Option<String>,
    /// Per-NIC override INDEX:ip=ADDR and/or INDEX:public (a public address: a host port forward).
    #[arg(long = "nic")]
    nics: Vec<String>,
    /// Planned failover: how long the server waits for the final logs (default: the config's
    /// failover.planned_wait_s, 1 h). The command shows which disks it still waits for; Ctrl-C
    /// only stops following (the failover keeps waiting): `drvault failover cancel --vm VM`
    /// stops the wait.
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
    /// Return once the job started instead of following it.
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum FailoverCmd {
    /// Delete what a test failover created and release its addresses (marks the drill done).
    Cleanup {
        #[arg(long)]
        vm: String,
    },
    /// End a planned or unplanned failover: the source's later logs are refused.
    Commit {
        #[arg(long)]
        vm: String,
    },
    /// Stop a planned failover that waits for the final logs (nothing is written; the VM
    /// stays protected).
    Cancel {
        #[arg(long)]
        vm: String,
    },
    /// The VM definition, disk paths, files written and the qemu command line.
    Show {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Set a NIC's failover override (kept with the VM): target subnet, static target IP, a
    /// public address (host port forward), or do-not-create. --clear removes it.
    Nic {
        name: String,
        index: u32,
        /// Target network/subnet instead of the mapping's.
        #[arg(long)]
        target: Option<String>,
        /// Static target IP.
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Give the NIC a public address (a host port forward in the qemu command).
        #[arg(long)]
        public: bool,
        /// Do not create this NIC at failover.
        #[arg(long)]
        skip: bool,
        #[arg(long)]
        clear: bool,
    },
    /// Set the replication interval, retention window or app-consistent frequency.
    Set {
        name: String,
        /// Replication interval: 30s, 5m or 15m.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// How long recovery points are kept (any length, e.g. 24h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<Duration>,
        /// App-consistent snapshot frequency (0s = none).
        #[arg(long, value_parser = humantime::parse_duration)]
        app_consistent_every: Option<Duration>,
    },
}

#[derive(Subcommand)]
enum HrlCmd {
    /// Write a log of the sectors where NEW differs from OLD (raw, VHD or VHDX).
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// UniqueId of the previous log of this disk (the chain); default all zeros, which
        /// only the first log after initial replication may use.
        #[arg(long)]
        previous_id: Option<String>,
        /// The previous log of this disk (its .hrl file): the new log follows it, taking its
        /// UniqueId as PreviousUniqueId and keeping its Vhd2DataWriteGuid. Use it for every
        /// log after the first, instead of --previous-id.
        #[arg(long, value_name = "PREVIOUS.hrl", conflicts_with_all = ["previous_id", "data_write_guid"])]
        after: Option<PathBuf>,
        /// UniqueId of this log; default random.
        #[arg(long)]
        unique_id: Option<String>,
        /// Vhd2DataWriteGuid of the disk (must stay the same along a chain); default all zeros.
        #[arg(long)]
        data_write_guid: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Validate a log and print its header and writes.
    Inspect {
        file: PathBuf,
        /// Check writes against this disk size.
        #[arg(long)]
        disk_size: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Apply a log to a raw image in place.
    Apply { file: PathBuf, image: PathBuf },
}

/// `--format` of the agent commands that read a disk image.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct DiskFormatArg {
    /// How to read the disk image: auto (a name ending in .vhd or .vhdx must hold that
    /// format, anything else is detected from the content), raw, vhd or vhdx. A .vhd/.vhdx
    /// file that does not parse is refused, never read as raw: pass --format raw if it
    /// really is a raw disk.
    #[arg(long, default_value_t = SourceFormat::Auto)]
    pub(crate) format: SourceFormat,
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Resynchronize one disk of an open resync session: fetch the replica's checksums, compare
    /// with PATH, upload only differing 4 KiB pieces. Rerun to resume.
    Resync(resync::AgentResyncArgs),
    /// Bring an on-premises disk (PATH) up to date with the failed-over VM's disk, downloading
    /// only what differs (--full: everything). Rerun to resume.
    Failback(resync::AgentFailbackArgs),
    /// Send one disk's change log (MS-HRL) for a replication cycle.
    Replicate {
        #[command(flatten)]
        conn: AgentConn,
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: String,
        #[arg(long)]
        hrl: PathBuf,
        /// Replication cycle (default: the disk's previous cycle + 1). Give every disk of a VM
        /// the same cycle so they form one VM recovery point.
        #[arg(long)]
        cycle: Option<u64>,
        /// The cycle was taken with an application-consistent snapshot.
        #[arg(long)]
        app_consistent: bool,
        /// The last log, sent after the source VM shut down (planned failover).
        #[arg(long = "final")]
        final_log: bool,
        #[arg(long)]
        json: bool,
    },
    /// Enable protection for a VM and replicate its disks in full (initial replication).
    /// Resumes where an interrupted run stopped.
    Protect {
        #[command(flatten)]
        conn: AgentConn,
        #[arg(long)]
        vm: String,
        /// A disk image (raw, VHD or VHDX, see --format), optionally with an id: PATH[:ID];
        /// the id defaults to the file name without extension. Repeat per disk.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        #[command(flatten)]
        format: DiskFormatArg,
        /// A NIC: network=NAME,mac=MAC[,ip=IP]. Repeat per NIC.
        #[arg(long = "nic")]
        nics: Vec<String>,
        /// VM generation: 1 (BIOS) or 2 (UEFI).
        #[arg(long, default_value_t = 2)]
        generation: u8,
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        #[arg(long, default_value_t = 4096)]
        memory_mib: u64,
        /// Replication interval in seconds (30, 300 or 900).
        #[arg(long)]
        interval: Option<u64>,
        /// Recovery point retention (e.g. 24h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<Duration>,
        /// Block uploads in flight.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> i32 {
    exit_quietly_on_broken_pipe();
    let matches = Cli::command().get_matches();
    if token_on_command_line(&matches) {
        eprintln!("{}", operator::TOKEN_ARG_WARNING);
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let is_serve = matches!(cli.cmd, Cmd::Serve { .. });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    if !is_serve {
        init_logging("warn", false);
    }
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            match e.downcast_ref::<crate::agent::AgentError>() {
                Some(a) => a.exit_code(),
                None => 1,
            }
        }
    }
}

/// Whether `--token` was given as an argument (other users see it in `ps`), not through
/// DRVAULT_TOKEN; the option is global, so it may sit at any level of subcommands.
fn token_on_command_line(matches: &clap::ArgMatches) -> bool {
    let mut level = Some(matches);
    while let Some(m) = level {
        // Only levels that define the option may be asked for its source (clap panics
        // otherwise), and clap also copies global values to the levels above.
        if matches!(m.try_contains_id("token"), Ok(true))
            && m.value_source("token") == Some(clap::parser::ValueSource::CommandLine)
        {
            return true;
        }
        level = m.subcommand().map(|(_, sub)| sub);
    }
    false
}

/// The error and its causes on one line, each said once: many errors already include their
/// cause in their own message ("writing X: No space left"), and anyhow's `{:#}` would repeat it.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if text.ends_with(&s) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}

/// Exit code of a command whose output reader went away, as if SIGPIPE had ended it.
pub const BROKEN_PIPE_EXIT: i32 = 128 + 13;

/// `drvault jobs | head`: once the reader has gone, writes to stdout fail with EPIPE (Rust
/// ignores SIGPIPE, and restoring it needs unsafe code) and `println!` panics with a backtrace
/// hint. That panic, and only that one, ends the process quietly as SIGPIPE would.
fn exit_quietly_on_broken_pipe() {
    let epipe = std::io::Error::from_raw_os_error(rustix::io::Errno::PIPE.raw_os_error());
    let closed: Vec<String> = ["stdout", "stderr"]
        .iter()
        .map(|stream| format!("failed printing to {stream}: {epipe}"))
        .collect();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| closed.iter().any(|c| c == m)) {
            std::process::exit(BROKEN_PIPE_EXIT);
        }
        default_hook(info)
    }));
}

fn init_logging(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal: log files and collectors get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(console())
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Serve {
            config,
            data_dir,
            listen,
        } => serve(config, data_dir, listen).await,
        Cmd::Status { wait, conn } => status(wait, conn).await,
        Cmd::Host { cmd, conn } => host(cmd, conn).await,
        Cmd::Provider { cmd, conn } => provider(cmd, conn).await,
        Cmd::Vms { name, json, conn } => vms(name, json, conn).await,
        Cmd::Jobs {
            cmd: Some(JobsCmd::Resume { id }),
            conn,
            ..
        } => {
            let j: crate::jobs::Job = conn
                .client()?
                .send_json(
                    Method::POST,
                    &format!("/v1/jobs/{id}/resume"),
                    &serde_json::json!({}),
                )
                .await?;
            println!("job {} ({}) resumed", j.id, j.title);
            Ok(0)
        }
        Cmd::Jobs {
            cmd: None,
            id,
            vm,
            json,
            conn,
        } => jobs(id, vm, json, conn).await,
        Cmd::Export {
            vm,
            disk,
            format,
            output,
            point,
            parallel,
            conn,
        } => {
            let client = conn.client()?;
            let start = std::time::Instant::now();
            let (bytes, blocks) = operator::export(
                &client,
                &vm,
                &disk,
                point.as_deref(),
                format == "vhd",
                &output,
                parallel,
                console(),
            )
            .await?;
            println!(
                "wrote {} ({} format): {} data blocks, {} of data, {:.1} s",
                output.display(),
                format,
                blocks,
                crate::util::human_bytes(bytes),
                start.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Cmd::Agent { cmd } => agent(cmd).await,
        Cmd::Points { vm, json, conn } => {
            let c = conn.client()?;
            let points: Vec<crate::replica::points::PointView> =
                c.get_json(&format!("/v1/vms/{vm}/points")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&points)?);
            } else {
                println!(
                    "{:<8} {:<22} {:<18} {:<6} {:<8} DISKS",
                    "POINT", "TIME", "KIND", "FINAL", "DAMAGED"
                );
                for p in &points {
                    if p.is_incomplete() {
                        println!(
                            "{:<8} {:<22} incomplete: waiting for {}{}",
                            p.id,
                            p.time,
                            p.waiting_for.join(", "),
                            if p.disks.is_empty() {
                                String::new()
                            } else {
                                format!(" (received: {})", p.disks.join(", "))
                            }
                        );
                        continue;
                    }
                    println!(
                        "{:<8} {:<22} {:<18} {:<6} {:<8} {}",
                        p.id,
                        p.time,
                        p.kind,
                        if p.final_point { "yes" } else { "" },
                        if p.damaged { "yes" } else { "" },
                        p.disks.join(",")
                    );
                    if let Some(d) = &p.damage {
                        println!("         {d}");
                    }
                }
            }
            Ok(0)
        }
        Cmd::Resync(a) => resync::resync_cmd(a).await,
        Cmd::Failback { cmd, conn } => resync::failback_cmd(cmd, conn).await,
        Cmd::Merge {
            vm,
            all,
            through,
            conn,
        } => {
            let c = conn.client()?;
            let r: crate::replica::points::MergeReport = c
                .send_json(
                    Method::POST,
                    &format!("/v1/vms/{vm}/merge"),
                    &serde_json::json!({"all": all, "through": through}),
                )
                .await?;
            println!(
                "merged {} logs on {} disks: {} blocks rewritten, {} of logs freed",
                r.logs_merged,
                r.disks,
                r.blocks_rewritten,
                crate::util::human_bytes(r.log_bytes_freed)
            );
            Ok(0)
        }
        Cmd::Verify(a) => scrub::verify(a).await,
        Cmd::Gc(a) => scrub::gc(a).await,
        Cmd::Hrl { cmd } => hrl_cmd(cmd).await,
        Cmd::Failover { cmd, start, conn } => failover_cmd(cmd, start, conn).await,
        Cmd::Plan { cmd, conn } => plan_cmd(cmd, conn).await,
        Cmd::Vm {
            cmd:
                VmCmd::Nic {
                    name,
                    index,
                    target,
                    ip,
                    public,
                    skip,
                    clear,
                },
            conn,
        } => {
            let c = conn.client()?;
            let path = format!("/v1/vms/{name}/nics/{index}");
            if clear {
                c.delete(&path).await?;
                println!("NIC {index} of {name}: override removed");
            } else {
                let o = crate::failover::definition::NicOptions {
                    static_ip: ip,
                    public_ip: public,
                    target,
                    skip,
                };
                let _: VmView = c.send_json(Method::PUT, &path, &o).await?;
                println!("NIC {index} of {name}: override set");
            }
            Ok(0)
        }
        Cmd::Vm {
            cmd:
                VmCmd::Set {
                    name,
                    interval,
                    retention,
                    app_consistent_every,
                },
            conn,
        } => {
            let c = conn.client()?;
            let change = crate::catalog::PolicyChange {
                interval_s: interval.map(|d| d.as_secs()),
                retention_s: retention.map(|d| d.as_secs()),
                app_consistent_every_s: app_consistent_every.map(|d| d.as_secs()),
            };
            let v: VmView = c
                .send_json(Method::PATCH, &format!("/v1/vms/{name}"), &change)
                .await?;
            println!(
                "VM {}: interval {} s, retention {} s, app-consistent every {} s",
                v.name, v.policy.interval_s, v.policy.retention_s, v.policy.app_consistent_every_s
            );
            Ok(0)
        }
        Cmd::Key { cmd, conn } => key::run(cmd, conn).await,
        Cmd::Bench { cmd } => Ok(crate::bench::run(cmd).await?),
    }
}

fn console() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

async fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
) -> Result<i32> {
    let mut cfg = match &config {
        Some(p) => crate::config::Config::load(p)?,
        None => crate::config::Config::default(),
    };
    if let Some(d) = data_dir {
        cfg.server.data_dir = d;
    }
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    cfg.validate()?;
    init_logging("info", cfg.server.log_format == "json");
    let prepared = crate::server::prepare(cfg.clone()).await?;
    let dd = &cfg.server.data_dir;
    println!(
        "drvault {} serving {}",
        env!("CARGO_PKG_VERSION"),
        prepared.url
    );
    println!("  vault           {}", cfg.vault_url()?);
    println!("  master key      {}", cfg.master_key_path().display());
    println!(
        "  operator token  {}",
        dd.join(crate::server::OPERATOR_TOKEN_FILE).display()
    );
    println!(
        "  server file     {}",
        dd.join(crate::server::SERVER_FILE).display()
    );
    println!(
        "  console         {}/ (sign in with the operator token)",
        prepared.url
    );
    println!("  metrics         {}/metrics", prepared.url);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    crate::server::run(prepared, crate::server::shutdown_signal()).await;
    Ok(0)
}

async fn status(wait: Option<Duration>, conn: Conn) -> Result<i32> {
    #[derive(serde::Deserialize)]
    struct Info {
        version: String,
    }
    let deadline = std::time::Instant::now() + wait.unwrap_or_default();
    loop {
        // server.json appears once the server listens; a stale one from a stopped server
        // fails to connect: both are retried while --wait lasts.
        let answer = async {
            let c = conn.client()?;
            let info: Info = c.get_json("/v1/server").await?;
            Ok::<_, anyhow::Error>((c.base().to_string(), info))
        }
        .await;
        match answer {
            Ok((url, info)) => {
                println!("drvault {} answers at {url}", info.version);
                return Ok(0);
            }
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn host(cmd: HostCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    match cmd {
        HostCmd::Add {
            name,
            cloud,
            output,
        } => {
            let out = output.unwrap_or_else(|| PathBuf::from(format!("{name}.creds.json")));
            let body = serde_json::json!({"name": name, "cloud": cloud});
            operator::register(&c, "hosts", &name, &body, &out).await?;
            println!("host {name} registered; credentials written to {} (copy it to the host, keep it secret)", out.display());
        }
        HostCmd::List { json } => {
            let v: serde_json::Value = c.get_json("/v1/hosts").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<16} {:<22} VMS", "HOST", "CLOUD", "REGISTERED");
                for h in v.as_array().into_iter().flatten() {
                    let vms: Vec<&str> = h["vms"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_str())
                        .collect();
                    println!(
                        "{:<24} {:<16} {:<22} {}",
                        h["name"].as_str().unwrap_or(""),
                        h["cloud"].as_str().unwrap_or("-"),
                        h["created"].as_str().unwrap_or(""),
                        vms.join(",")
                    );
                }
            }
        }
        HostCmd::Remove { name } => {
            c.delete(&format!("/v1/hosts/{name}")).await?;
            println!("host {name} removed; its token no longer works");
        }
    }
    Ok(0)
}

async fn provider(cmd: ProviderCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    match cmd {
        ProviderCmd::Add {
            name,
            cloud,
            output,
        } => {
            let out = output.unwrap_or_else(|| PathBuf::from(format!("{name}.creds.json")));
            let body = serde_json::json!({"name": name, "cloud": cloud});
            operator::register(&c, "providers", &name, &body, &out).await?;
            println!(
                "provider {name} registered for cloud {cloud}; credentials written to {}",
                out.display()
            );
        }
        ProviderCmd::List { json } => {
            let v: serde_json::Value = c.get_json("/v1/providers").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<16} REGISTERED", "PROVIDER", "CLOUD");
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<16} {}",
                        p["name"].as_str().unwrap_or(""),
                        p["cloud"].as_str().unwrap_or(""),
                        p["created"].as_str().unwrap_or("")
                    );
                }
            }
        }
        ProviderCmd::Remove { name } => {
            c.delete(&format!("/v1/providers/{name}")).await?;
            println!("provider {name} removed");
        }
    }
    Ok(0)
}

async fn vms(name: Option<String>, json: bool, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    let list: Vec<VmView> = match &name {
        Some(n) => vec![c.get_json(&format!("/v1/vms/{n}")).await?],
        None => c.get_json("/v1/vms").await?,
    };
    if json {
        let v = if name.is_some() {
            serde_json::to_value(&list[0])?
        } else {
            serde_json::to_value(&list)?
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    // A failover in progress or not yet committed says so instead of `protected`.
    let states = list
        .iter()
        .map(|v| match &v.failover {
            Some(f) => Ok(f.summary.clone()),
            None => Ok(serde_json::to_value(v.state)?
                .as_str()
                .unwrap_or("")
                .to_string()),
        })
        .collect::<Result<Vec<String>>>()?;
    let sw = states.iter().map(|s| s.len()).max().unwrap_or(0).max(20);
    println!(
        "{:<20} {:<sw$} {:<8} {:<12} {:>6} {:>9}  REASONS",
        "VM", "STATE", "HEALTH", "HOST", "DISKS", "PROGRESS"
    );
    for (v, state) in list.iter().zip(&states) {
        println!(
            "{:<20} {:<sw$} {:<8} {:<12} {:>6} {:>8.1}%  {}",
            v.name,
            state,
            format!("{:?}", v.health),
            v.owner,
            v.disks.len(),
            v.progress * 100.0,
            v.health_reasons.join("; ")
        );
        if name.is_some() {
            for d in &v.disks {
                println!(
                    "  disk {:<16} {:>10}  {:?}  blocks {}/{} received, {} data, {} zero (block {} )",
                    d.id,
                    crate::util::human_bytes(d.size),
                    d.state,
                    d.blocks_received,
                    d.blocks,
                    d.data_blocks,
                    d.zero_blocks,
                    crate::util::human_bytes(d.block_size as u64)
                );
            }
            for n in &v.nics {
                println!(
                    "  nic  {} on {} ip {}",
                    n.mac,
                    n.network,
                    n.ip.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(0)
}

async fn jobs(id: Option<String>, vm: Option<String>, json: bool, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    if let Some(id) = id {
        let j: crate::jobs::Job = c.get_json(&format!("/v1/jobs/{id}")).await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            println!(
                "{} {} [{}] {:.0}% vm={}",
                j.id,
                j.title,
                j.state.as_str(),
                j.progress * 100.0,
                j.vm.as_deref().unwrap_or("-")
            );
            for s in &j.steps {
                println!("  {:<18} {}", s.state.as_str(), s.name);
            }
            if let Some(e) = &j.error {
                println!(
                    "  error: {} ({}, recoverable: {})",
                    e.message, e.code, e.recoverable
                );
            }
        }
        return Ok(0);
    }
    let path = match &vm {
        Some(v) => format!("/v1/jobs?vm={v}"),
        None => "/v1/jobs".to_string(),
    };
    let list: Vec<crate::jobs::Job> = c.get_json(&path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<36} {:<22} {:<16} {:<18} {:>5} {:>8}  ERROR",
        "ID", "JOB", "VM", "STATE", "PROG", "DURATION"
    );
    for j in &list {
        let dur = match (j.started_unix, j.ended_unix) {
            (Some(s), Some(e)) => format!("{}s", e.saturating_sub(s)),
            (Some(s), None) => format!("{}s", crate::util::unix_now().saturating_sub(s)),
            _ => "-".into(),
        };
        println!(
            "{:<36} {:<22} {:<16} {:<18} {:>4.0}% {:>8}  {}",
            j.id,
            j.title,
            j.vm.as_deref().unwrap_or("-"),
            j.state.as_str(),
            j.progress * 100.0,
            dur,
            j.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
        );
    }
    Ok(0)
}

fn parse_nic(s: &str) -> Result<NicSpec> {
    let (mut network, mut mac, mut ip) = (None, None, None);
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("network", v)) => network = Some(v.to_string()),
            Some(("mac", v)) => mac = Some(v.to_string()),
            Some(("ip", v)) => ip = Some(v.to_string()),
            _ => bail!("--nic {s:?}: expected network=NAME,mac=MAC[,ip=IP]"),
        }
    }
    match (network, mac) {
        (Some(network), Some(mac)) => Ok(NicSpec { network, mac, ip }),
        _ => bail!("--nic {s:?}: network= and mac= are required"),
    }
}

fn parse_nic_option(s: &str) -> Result<(u32, crate::failover::definition::NicOptions)> {
    let (idx, rest) = s
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--nic {s:?}: expected INDEX:ip=ADDR or INDEX:public"))?;
    let idx: u32 = idx
        .parse()
        .map_err(|_| anyhow::anyhow!("--nic {s:?}: {idx:?} is not a NIC index"))?;
    let mut o = crate::failover::definition::NicOptions::default();
    for part in rest.split(',') {
        match part.split_once('=') {
            Some(("ip", v)) => {
                o.static_ip =
                    Some(v.parse().map_err(|_| {
                        anyhow::anyhow!("--nic {s:?}: {v:?} is not an IPv4 address")
                    })?)
            }
            None if part == "public" => o.public_ip = true,
            _ => bail!("--nic {s:?}: expected INDEX:ip=ADDR and/or INDEX:public"),
        }
    }
    Ok((idx, o))
}

async fn failover_cmd(cmd: Option<FailoverCmd>, start: FailoverStart, conn: Conn) -> Result<i32> {
    use crate::failover::service::{FailoverRecord, FailoverView};
    let c = conn.client()?;
    match cmd {
        Some(FailoverCmd::Cleanup { vm }) => {
            let r: FailoverRecord = c
                .send_json(
                    Method::POST,
                    &format!("/v1/vms/{vm}/failover/cleanup"),
                    &serde_json::json!({}),
                )
                .await?;
            println!(
                "test failover {} of {vm} cleaned up; drill successful: {}",
                r.id,
                r.drill_successful.unwrap_or(false)
            );
            Ok(0)
        }
        Some(FailoverCmd::Commit { vm }) => {
            let r: FailoverRecord = c
                .send_json(
                    Method::POST,
                    &format!("/v1/vms/{vm}/failover/commit"),
                    &serde_json::json!({}),
                )
                .await?;
            println!(
                "failover {} of {vm} committed at point {}",
                r.id,
                r.point.unwrap_or_default()
            );
            Ok(0)
        }
        Some(FailoverCmd::Cancel { vm }) => {
            let r: FailoverRecord = c
                .send_json(
                    Method::POST,
                    &format!("/v1/vms/{vm}/failover/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            println!(
                "planned failover {} of {vm}: stops waiting for the final logs",
                r.id
            );
            Ok(0)
        }
        Some(FailoverCmd::Show { vm, json }) => {
            let v: FailoverView = c.get_json(&format!("/v1/vms/{vm}/failover")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let r = &v.record;
                println!(
                    "failover {} of {}: {:?} {:?} at point {}",
                    r.id,
                    r.vm,
                    r.kind,
                    r.state,
                    r.point.as_deref().unwrap_or("-")
                );
                println!("  output     {}", r.output_dir);
                if let Some(d) = &v.definition {
                    println!(
                        "  firmware   {:?}, {} CPUs, {} MiB",
                        d.firmware, d.cpus, d.memory_mib
                    );
                    for disk in &d.disks {
                        println!(
                            "  disk       {} {} ({} bytes{})",
                            disk.id,
                            disk.path,
                            disk.virtual_size,
                            if disk.padded_to_mib {
                                ", padded to whole MiB"
                            } else {
                                ""
                            }
                        );
                    }
                    for n in &d.nics {
                        println!(
                            "  nic        {} on {}/{} ip {}/{} gw {} ({:?})",
                            n.mac, n.network, n.subnet, n.ip, n.prefix_len, n.gateway, n.rule
                        );
                    }
                }
                for f in &r.files {
                    println!("  file       {f}");
                }
                if let Some(q) = &v.qemu_command {
                    println!("  boot with  {}", q.join(" "));
                }
                if let Some(why) = &v.qemu_unavailable {
                    println!("  qemu.sh    not written: {why}");
                }
                if let Some(e) = &r.error {
                    println!("  error      {e}");
                }
            }
            Ok(0)
        }
        None if start.plan.is_some() => {
            let plan = start.plan.unwrap_or_default();
            let kind = start
                .kind
                .ok_or_else(|| anyhow::anyhow!("--kind test|planned|unplanned is required"))?;
            #[derive(serde::Deserialize)]
            struct Started {
                job: String,
            }
            let s: Started = c
                .send_json(
                    Method::POST,
                    &format!("/v1/plans/{plan}/failover"),
                    &serde_json::json!({"kind": kind, "point": start.point}),
                )
                .await?;
            if start.no_wait {
                println!("plan {plan} {kind} failover started: job {}", s.job);
                return Ok(0);
            }
            let job = wait_job(&c, &s.job).await?;
            for st in &job.steps {
                println!("  {:<18} {}", st.state.as_str(), st.name);
            }
            if job.state != crate::jobs::JobState::Succeeded {
                let e = job.error.map(|e| e.message).unwrap_or_default();
                bail!("plan {plan} failed: {e}");
            }
            println!("plan {plan}: {kind} failover succeeded");
            Ok(0)
        }
        None => {
            let vm = start.vm.ok_or_else(|| {
                anyhow::anyhow!(
                    "--vm or --plan is required (or a subcommand: cleanup, commit, show)"
                )
            })?;
            let kind = start
                .kind
                .ok_or_else(|| anyhow::anyhow!("--kind test|planned|unplanned is required"))?;
            let mut nics = serde_json::Map::new();
            for n in &start.nics {
                let (i, o) = parse_nic_option(n)?;
                nics.insert(i.to_string(), serde_json::to_value(o)?);
            }
            let body = serde_json::json!({"kind": kind, "point": start.point, "nics": nics, "wait_s": start.wait.map(|d| d.as_secs())});
            let r: FailoverRecord = c
                .send_json(Method::POST, &format!("/v1/vms/{vm}/failover"), &body)
                .await?;
            if start.no_wait {
                println!("{kind} failover {} of {vm} started: job {}", r.id, r.job);
                return Ok(0);
            }
            let job = wait_job(&c, &r.job).await?;
            let v: FailoverView = c.get_json(&format!("/v1/vms/{vm}/failover")).await?;
            if start.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if job.state == crate::jobs::JobState::Succeeded {
                println!(
                    "{kind} failover of {vm} succeeded at point {} -> {}",
                    v.record.point.as_deref().unwrap_or("-"),
                    v.record.output_dir
                );
            }
            if job.state != crate::jobs::JobState::Succeeded {
                let e = job
                    .error
                    .map(|e| format!("{} [{}]", e.message, e.code))
                    .unwrap_or_default();
                bail!("{kind} failover of {vm} failed: {e}");
            }
            Ok(0)
        }
    }
}

async fn plan_cmd(cmd: PlanCmd, conn: Conn) -> Result<i32> {
    use crate::failover::plan::{Plan, PlanGroup};
    let c = conn.client()?;
    match cmd {
        PlanCmd::Create {
            name,
            groups,
            pre,
            post,
            pause,
        } => {
            let mut gs: Vec<PlanGroup> = groups
                .iter()
                .map(|g| PlanGroup {
                    vms: g
                        .split(',')
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                        .collect(),
                    pre: None,
                    post: None,
                    pause_before: false,
                })
                .collect();
            let slot = |spec: &str, gs: &mut Vec<PlanGroup>| -> Result<(usize, String)> {
                let (n, cmd) = spec
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("{spec:?}: expected N:COMMAND"))?;
                let n: usize = n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{spec:?}: {n:?} is not a group number"))?;
                if n == 0 || n > gs.len() {
                    bail!("{spec:?}: the plan has groups 1 to {}", gs.len());
                }
                Ok((n - 1, cmd.to_string()))
            };
            for p in &pre {
                let (i, cmd) = slot(p, &mut gs)?;
                gs[i].pre = Some(cmd);
            }
            for p in &post {
                let (i, cmd) = slot(p, &mut gs)?;
                gs[i].post = Some(cmd);
            }
            for &n in &pause {
                if n == 0 || n > gs.len() {
                    bail!("--pause {n}: the plan has groups 1 to {}", gs.len());
                }
                gs[n - 1].pause_before = true;
            }
            let p: Plan = c
                .send_json(Method::POST, "/v1/plans", &Plan { name, groups: gs })
                .await?;
            println!("plan {} created with {} groups", p.name, p.groups.len());
        }
        PlanCmd::List { json } => {
            let plans: Vec<Plan> = c.get_json("/v1/plans").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plans)?);
            } else {
                for p in &plans {
                    let groups: Vec<String> = p
                        .groups
                        .iter()
                        .map(|g| format!("[{}]", g.vms.join(",")))
                        .collect();
                    println!("{:<20} {}", p.name, groups.join(" -> "));
                }
            }
        }
    }
    Ok(0)
}

/// Follows a job until it ends, showing its progress.
async fn wait_job(c: &crate::client::Client, id: &str) -> Result<crate::jobs::Job> {
    use crate::agent::protect::FRACTION_STEPS;
    let bar = crate::agent::protect::fraction_bar(console(), "job");
    let mut told: Option<String> = None;
    loop {
        let j: crate::jobs::Job = c.get_json(&format!("/v1/jobs/{id}")).await?;
        if j.waiting_for != told {
            if let Some(w) = &j.waiting_for {
                let vm = j.vm.as_deref().unwrap_or("VM");
                bar.suspend(|| {
                    eprintln!("waiting for {w} (Ctrl-C stops following, not the wait: `drvault failover cancel --vm {vm}` does)")
                });
            }
            told = j.waiting_for.clone();
        }
        bar.set_position((j.progress.clamp(0.0, 1.0) * FRACTION_STEPS as f64) as u64);
        bar.set_message(j.state.as_str().to_string());
        if j.state.is_final() {
            bar.finish_and_clear();
            return Ok(j);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn guid_arg(
    s: Option<String>,
    default: crate::format::hrl::Guid,
) -> Result<crate::format::hrl::Guid> {
    match s {
        Some(t) => t.parse().map_err(|_| {
            anyhow::anyhow!("{t:?} is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
        }),
        None => Ok(default),
    }
}

async fn hrl_cmd(cmd: HrlCmd) -> Result<i32> {
    use crate::format::hrl::Guid;
    match cmd {
        HrlCmd::Diff {
            old,
            new,
            output,
            previous_id,
            after,
            unique_id,
            data_write_guid,
            json,
        } => {
            let (prev, dw) = match after {
                Some(path) => {
                    tokio::task::spawn_blocking(move || hrl::chain_after(&path)).await??
                }
                None => (
                    guid_arg(previous_id, Guid::NIL)?,
                    guid_arg(data_write_guid, Guid::NIL)?,
                ),
            };
            let uid = guid_arg(unique_id, Guid::new_random())?;
            let s =
                tokio::task::spawn_blocking(move || hrl::diff(&old, &new, &output, prev, uid, dw))
                    .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "log {} (after {}): {} writes, {} of data, {} log",
                    s.unique_id,
                    s.previous_unique_id,
                    s.extents,
                    crate::util::human_bytes(s.data_bytes),
                    crate::util::human_bytes(s.log_bytes)
                );
            }
        }
        HrlCmd::Inspect {
            file,
            disk_size,
            json,
        } => {
            let log = tokio::task::spawn_blocking(move || hrl::inspect(&file, disk_size)).await??;
            hrl::print(&log, json)?;
        }
        HrlCmd::Apply { file, image } => {
            let (n, bytes) =
                tokio::task::spawn_blocking(move || hrl::apply(&file, &image)).await??;
            println!("applied {n} writes ({})", crate::util::human_bytes(bytes));
        }
    }
    Ok(0)
}

async fn agent(cmd: AgentCmd) -> Result<i32> {
    match cmd {
        AgentCmd::Replicate {
            conn,
            vm,
            disk,
            hrl,
            cycle,
            app_consistent,
            final_log,
            json,
        } => {
            let creds = crate::agent::load_creds(&conn.creds)?;
            let client = crate::agent::client_for(&creds, conn.host.clone())?;
            let opts = crate::agent::replicate::ReplicateOptions {
                vm,
                disk,
                cycle,
                app_consistent,
                final_log,
                backoff: Backoff {
                    scale: conn.backoff_scale,
                    give_up_after: conn.give_up_after,
                },
            };
            let ack = crate::agent::replicate::replicate(&client, &hrl, &opts)
                .await
                .context("replicate")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ack)?);
            } else {
                println!(
                    "log {} {} as cycle {} ({} logs pending, {}){}",
                    ack.log_id,
                    ack.status.replace('_', " "),
                    ack.cycle,
                    ack.journal_length,
                    crate::util::human_bytes(ack.pending_log_bytes),
                    ack.resync_required
                        .as_deref()
                        .map(|r| format!("; RESYNC REQUIRED: {r}"))
                        .unwrap_or_default()
                );
            }
            Ok(0)
        }
        AgentCmd::Resync(a) => resync::agent_resync(a).await,
        AgentCmd::Failback(a) => resync::agent_failback(a).await,
        AgentCmd::Protect {
            conn,
            vm,
            disks,
            nics,
            generation,
            cpus,
            memory_mib,
            interval,
            retention,
            parallel,
            json,
            format,
        } => {
            let creds = crate::agent::load_creds(&conn.creds)?;
            let client = crate::agent::client_for(&creds, conn.host.clone())?;
            let mut sources = Vec::new();
            for d in &disks {
                let (path, id) = match d.rsplit_once(':') {
                    Some((p, id)) if !id.contains('/') => (PathBuf::from(p), Some(id.to_string())),
                    _ => (PathBuf::from(d), None),
                };
                sources.push(crate::agent::protect::open_disk(&path, id, format.format)?);
            }
            let nics = nics
                .iter()
                .map(|n| parse_nic(n))
                .collect::<Result<Vec<_>>>()?;
            let policy = match (interval, retention) {
                (None, None) => None,
                (i, r) => {
                    let d = Policy::default();
                    Some(Policy {
                        interval_s: i.unwrap_or(d.interval_s),
                        retention_s: r.map(|r| r.as_secs()).unwrap_or(d.retention_s),
                        ..d
                    })
                }
            };
            let opts = crate::agent::protect::ProtectOptions {
                vm,
                generation,
                cpus,
                memory_mib,
                nics,
                policy,
                parallel,
                backoff: Backoff {
                    scale: conn.backoff_scale,
                    give_up_after: conn.give_up_after,
                },
                progress: console() && !json,
                upload_latencies: None,
            };
            let summary = crate::agent::protect::protect(&client, &sources, &opts)
                .await
                .context("protect")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
                    "VM {}: {} ({:.1} s)",
                    summary.vm, summary.state, summary.seconds
                );
                for d in &summary.disks {
                    println!(
                        "  disk {}: {} blocks, {} data, {} zero skipped, {} already on server, {} uploaded ({}), {} deduplicated, {:.1} s",
                        d.id,
                        d.blocks,
                        d.data_blocks,
                        d.zero_blocks,
                        d.already_on_server,
                        d.uploaded_blocks,
                        crate::util::human_bytes(d.uploaded_bytes),
                        d.deduplicated_blocks,
                        d.seconds
                    );
                }
            }
            Ok(0)
        }
    }
}
