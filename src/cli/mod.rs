//! The `drvault` command line: one binary for the server, the operator tools, the reference
//! agent and the benchmark harness. Every operator and agent command is a client of the HTTPS
//! API; nothing here reaches into the vault directly.

mod accounts;
mod agent;
mod audit;
mod failover;
mod hosts;
pub mod hrl;
mod jobs;
pub mod key;
mod network;
pub mod operator;
mod plans;
pub mod resync;
pub mod scrub;
mod server;
mod vms;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::format::image::SourceFormat;
use crate::wire::{NicOptions, PolicyChange};
use jobs::wait_job;
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
Read a disk back:          drvault export --vm web01 --disk web01 --format vhd -o web01.vhd",
    after_help = EXIT_CODES_HELP
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
    /// Print the API's OpenAPI 3.1 description (what GET /v1/openapi.json serves and
    /// docs/openapi.json holds); needs no server.
    Openapi,
    /// Check that the server answers (operator); --wait retries until it does, for scripts
    /// that start `drvault serve &` and go on at once.
    Status {
        /// Keep trying this long (e.g. 30s) while the server is starting.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// The servers sharing this server's vault: which are live, the VMs each holds, lease ages
    /// (viewer). A server that stops answering loses its VMs to the others after the lease TTL.
    Servers {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register, list and remove Hyper-V hosts (operator).
    Host {
        #[command(subcommand)]
        cmd: hosts::HostCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Register, list and remove VMM-style providers that act for every host of a cloud (operator).
    Provider {
        #[command(subcommand)]
        cmd: hosts::ProviderCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Operator accounts (viewer, operator, admin) and their tokens (admin; list: viewer).
    #[command(after_help = accounts::ROLES_HELP)]
    Account {
        #[command(subcommand)]
        cmd: accounts::AccountCmd,
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
        cmd: Option<jobs::JobsCmd>,
        /// A job id to show in detail.
        id: Option<String>,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a replicated disk as a fixed VHD, a dynamic VHDX (only blocks with data allocated:
    /// what a Hyper-V host takes back) or a raw image, verifying every block (operator).
    Export {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        disk: String,
        #[arg(long, value_parser = ["vhd", "vhdx", "raw"], default_value = "vhd")]
        format: String,
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Recovery point: latest, latest-app, c<cycle>, or an RFC 3339 time (the latest point at
        /// or before it). Default: latest.
        #[arg(long)]
        point: Option<String>,
        /// Blocks fetched in parallel.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        #[command(flatten)]
        conn: Conn,
    },
    /// Change a protected VM's replication policy or NIC overrides, or disable its protection
    /// (operator).
    Vm {
        #[command(subcommand)]
        cmd: vms::VmCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Fail a VM over to a recovery point (test, planned, unplanned), or clean up, commit, show.
    #[command(args_conflicts_with_subcommands = true)]
    Failover {
        #[command(subcommand)]
        cmd: Option<failover::FailoverCmd>,
        #[command(flatten)]
        start: failover::FailoverStart,
        #[command(flatten)]
        conn: Conn,
    },
    /// Recovery plans: groups of VMs failed over in order (operator).
    Plan {
        #[command(subcommand)]
        cmd: plans::PlanCmd,
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
    /// mark the recovery points that need it (operator). Exit status 7 when damage was found.
    Verify(scrub::VerifyArgs),
    /// List the damaged objects verify registered and the recovery points that need them,
    /// without running a verify (operator).
    Damage {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// The audit log: who did what, when, from where, with what result (operator).
    Audit(audit::AuditArgs),
    /// Delete objects no retained point or open session references, older than the grace
    /// period (operator). Safe while agents upload.
    Gc(scrub::GcArgs),
    /// Make, read and apply MS-HRL change logs (no server needed).
    Hrl {
        #[command(subcommand)]
        cmd: hrl::HrlCmd,
    },
    /// The reference host agent.
    Agent {
        #[command(subcommand)]
        cmd: agent::AgentCmd,
    },
    /// The vault's encryption keys: list them, rotate to a new one (operator).
    Key {
        #[command(subcommand)]
        cmd: key::KeyCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Set a target network up on this host for failed-over VMs' qemu.sh: bridges with the
    /// gateway addresses and DHCP with the failovers' reservations (root).
    Network {
        #[command(subcommand)]
        cmd: network::NetworkCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Measure ingest throughput, latency and server cost against same-run baselines.
    Bench {
        #[command(subcommand)]
        cmd: crate::bench::BenchCmd,
    },
    /// Print a shell completion script: `source <(drvault completions bash)`, or save it where
    /// the shell loads completions from (e.g. /usr/share/bash-completion/completions/drvault).
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the man page drvault(1), or with --dir write one page per command and subcommand
    /// (drvault.1, drvault-failover.1, drvault-failover-commit.1, ...) into that directory.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// The shells `drvault completions` writes scripts for.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// The exit status of every command. `main` derives it from the error in one place
/// ([`exit_code`]); this table is also the `drvault --help` epilogue and the README's.
pub mod exit {
    pub const OK: i32 = 0;
    /// Anything not below: a local file, a value refused before asking the server, a server
    /// answer that could not be read.
    pub const ERROR: i32 = 1;
    /// The command line itself: unknown command or option, missing or malformed argument.
    pub const USAGE: i32 = 2;
    /// Temporary: the server said to come back later (busy, resync scheduled or running), or
    /// the agent gave up retrying such errors or an unreachable server.
    pub const RETRY_LATER: i32 = 3;
    /// The server refused the request and retrying will not change that (not found, conflict,
    /// invalid, not allowed: the message carries the server's error code).
    pub const REFUSED: i32 = 4;
    /// The server could not be reached (connection refused, TLS, timeout).
    pub const UNREACHABLE: i32 = 5;
    /// A job the command started and followed (failover, plan, verify, gc) ended failed.
    pub const JOB_FAILED: i32 = 6;
    /// `drvault verify` found damage (the report lists it).
    pub const DAMAGE: i32 = 7;
    /// The reader of the output went away (`drvault jobs | head`), as SIGPIPE would.
    pub const BROKEN_PIPE: i32 = 128 + 13;
}

/// The exit-code table as `drvault --help` shows it (kept beside [`exit`]).
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success
  1    error not listed below (a local file, a value refused before asking the server)
  2    usage: unknown command or option, missing or malformed argument
  3    temporary: the server said to retry later, or the agent gave up retrying
  4    refused by the server (not found, conflict, invalid, not allowed)
  5    server unreachable (connection refused, TLS, timeout)
  6    a job the command followed (failover, plan, verify, gc) failed
  7    verify found damage
  141  output closed early (e.g. piped into head)";

/// A job the command followed to its end did not succeed ([`exit::JOB_FAILED`]).
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {reason}")]
pub struct JobFailed {
    what: String,
    reason: String,
}

impl JobFailed {
    /// `what` names the job for the message ("test failover of web01", "job ID (Verify)").
    fn new(what: impl Into<String>, job: &crate::wire::Job) -> JobFailed {
        let reason = match &job.error {
            Some(e) => format!("{} [{}]", e.message, e.code),
            None => format!("ended {}", job.state.as_str()),
        };
        JobFailed {
            what: what.into(),
            reason,
        }
    }
}

/// The exit status for a failed command: the first cause in the chain that the table names.
fn exit_code(e: &anyhow::Error) -> i32 {
    use crate::agent::AgentError;
    use crate::client::ClientError;
    let client = |c: &ClientError| match c {
        ClientError::Transport(_) => exit::UNREACHABLE,
        ClientError::Api { .. } if c.recoverable() => exit::RETRY_LATER,
        ClientError::Api { .. } => exit::REFUSED,
        ClientError::Decode(_) | ClientError::Setup(_) => exit::ERROR,
    };
    for cause in e.chain() {
        if cause.is::<JobFailed>() {
            return exit::JOB_FAILED;
        }
        if let Some(a) = cause.downcast_ref::<AgentError>() {
            return match a {
                // The agent retries what is recoverable (unreachable included) before it
                // gives up; an error that reaches here unretried was meant to be waited out.
                AgentError::GaveUp { .. } => exit::RETRY_LATER,
                AgentError::Client(c) if c.recoverable() => exit::RETRY_LATER,
                AgentError::Client(c) => client(c),
                _ => exit::ERROR,
            };
        }
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return client(c);
        }
    }
    exit::ERROR
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
    /// Send block, patch and log bodies as they are instead of zstd-compressed (compression
    /// roughly halves the bytes on the wire on typical disks and costs the host CPU).
    #[arg(long, env = "DRVAULT_AGENT_NO_COMPRESS")]
    no_compress: bool,
}

impl AgentConn {
    /// A client for these credentials, compressing uploads unless `--no-compress`.
    fn client(&self) -> anyhow::Result<crate::client::Client> {
        let creds = crate::agent::load_creds(&self.creds)?;
        Ok(
            crate::agent::client_for(&creds, self.host.clone())?
                .compress_uploads(!self.no_compress),
        )
    }
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

/// Entry point of the binary.
pub fn main() -> i32 {
    exit_quietly_on_broken_pipe();
    let matches = Cli::command().get_matches();
    if token_on_command_line(&matches) {
        eprintln!("{}", operator::TOKEN_ARG_WARNING);
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The server and the long-running agent set up their own logging (level info).
    let is_serve = matches!(
        cli.cmd,
        Cmd::Serve { .. }
            | Cmd::Agent {
                cmd: agent::AgentCmd::Run { .. },
                ..
            }
    );
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
            exit_code(&e)
        }
    }
}

/// `drvault completions SHELL`: the script on stdout.
fn completions(shell: CompletionShell) -> i32 {
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "drvault", &mut std::io::stdout());
    exit::OK
}

/// `drvault man [--dir DIR]`: drvault(1) on stdout, or every page into DIR.
fn man(dir: Option<&std::path::Path>) -> i32 {
    let cmd = Cli::command();
    let done = match dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
        Some(d) => std::fs::create_dir_all(d)
            .and_then(|()| clap_mangen::generate_to(cmd, d))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display()))),
    };
    match done {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: writing the man pages: {e}");
            exit::ERROR
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
pub const BROKEN_PIPE_EXIT: i32 = exit::BROKEN_PIPE;

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
        } => server::serve(config, data_dir, listen).await,
        Cmd::Openapi => {
            print!("{}", crate::api::openapi::document_json());
            Ok(0)
        }
        Cmd::Status { wait, json, conn } => server::status(wait, json, conn).await,
        Cmd::Servers { json, conn } => server::servers(json, conn).await,
        Cmd::Host { cmd, conn } => hosts::host(cmd, conn).await,
        Cmd::Provider { cmd, conn } => hosts::provider(cmd, conn).await,
        Cmd::Account { cmd, conn } => accounts::account(cmd, conn).await,
        Cmd::Vms { name, json, conn } => vms::vms(name, json, conn).await,
        Cmd::Jobs {
            cmd: Some(jobs::JobsCmd::Resume { id }),
            conn,
            ..
        } => jobs::resume(&id, conn).await,
        Cmd::Jobs {
            cmd: None,
            id,
            vm,
            json,
            conn,
        } => jobs::jobs(id, vm, json, conn).await,
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
            let as_format = crate::client::export::ExportFormat::parse(&format)
                .ok_or_else(|| anyhow::anyhow!("unknown export format {format}"))?;
            let (bytes, blocks) = crate::client::export::export_as(
                &client,
                &vm,
                &disk,
                point.as_deref(),
                as_format,
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
        Cmd::Agent { cmd } => agent::agent(cmd).await,
        Cmd::Points { vm, json, conn } => vms::points(&vm, json, conn).await,
        Cmd::Resync(a) => resync::resync_cmd(a).await,
        Cmd::Failback { cmd, conn } => resync::failback_cmd(cmd, conn).await,
        Cmd::Merge {
            vm,
            all,
            through,
            conn,
        } => vms::merge(&vm, all, through, conn).await,
        Cmd::Verify(a) => scrub::verify(a).await,
        Cmd::Damage { json, conn } => scrub::damage(json, conn).await,
        Cmd::Gc(a) => scrub::gc(a).await,
        Cmd::Audit(a) => audit::run(a).await,
        Cmd::Hrl { cmd } => hrl::hrl_cmd(cmd).await,
        Cmd::Failover { cmd, start, conn } => failover::failover_cmd(cmd, start, conn).await,
        Cmd::Plan { cmd, conn } => plans::plan_cmd(cmd, conn).await,
        Cmd::Vm {
            cmd:
                vms::VmCmd::Nic {
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
            vms::nic(
                &name,
                index,
                NicOptions {
                    static_ip: ip,
                    public_ip: public,
                    target,
                    skip,
                },
                clear,
                conn,
            )
            .await
        }
        Cmd::Vm {
            cmd:
                vms::VmCmd::Set {
                    name,
                    interval,
                    retention,
                    app_consistent_every,
                },
            conn,
        } => {
            let change = PolicyChange {
                interval_s: interval.map(|d| d.as_secs()),
                retention_s: retention.map(|d| d.as_secs()),
                app_consistent_every_s: app_consistent_every.map(|d| d.as_secs()),
            };
            vms::set_policy(&name, &change, conn).await
        }
        Cmd::Vm {
            cmd: vms::VmCmd::Disable { vm, delete_data },
            conn,
        } => vms::disable(&vm, delete_data, conn).await,
        Cmd::Key { cmd, conn } => key::run(cmd, conn).await,
        Cmd::Network { cmd, conn } => network::run(cmd, conn).await,
        Cmd::Bench { cmd } => Ok(crate::bench::run(cmd).await?),
        Cmd::Completions { shell } => Ok(completions(shell)),
        Cmd::Man { dir } => Ok(man(dir.as_deref())),
    }
}

/// `--json` output of every command: pretty-printed, the keys of every object in alphabetical
/// order (through `serde_json::Value`, whose maps are sorted), so scripts and diffs see the
/// same shape from every listing.
pub(crate) fn print_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::to_value(v)?)?
    );
    Ok(())
}

fn console() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
