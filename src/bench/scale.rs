//! `drvault bench scale`: several `drvault serve` processes on one vault (issue 19).
//!
//! Every server of a row is spawned by this harness with its own data directory and loopback
//! port, and all of them with the same vault URL, the same master key file and the same TLS
//! certificate (made once per row under the row's directory): how servers behind one DNS name
//! are deployed. Hosts are registered on the first server before the others start; agent k
//! replicates through server k mod N.
//!
//! | figure | how it is measured |
//! |---|---|
//! | aggregate MB/s, N servers | the same total data (`--agents` VMs of one `--size` disk: initial replication, then one change log each) over the wall time from the first request to the last acknowledgement, for each N of `--servers` |
//! | server CPU s/GB, N servers | utime+stime (`/proc/PID/stat`) summed over the N server processes, per logical GB |
//! | peak RSS MiB, server i of N | `VmHWM` of each server process |
//! | fleet MB/s | `--fleet-agents` agents spread over `--fleet-servers` servers against `--single-agents` on one, each with a `--fleet-size` disk |
//! | time to replicate again after a server's death | with `--fleet-servers` servers, SIGKILL one; time until every VM it served had a newer point accepted through another server, against the lease TTL |
//!
//! Decisions the brief left open:
//! * The same-run baseline of the per-N figures is the 1-server row (the first of `--servers`
//!   when 1 is not in the list); ratios are against it. For CPU per GB, a ratio near 1 means
//!   the work per byte does not grow with the number of servers.
//! * Every row runs on a fresh vault (a new directory, container or bucket), so rows do not
//!   deduplicate against each other, and agents get distinct variants of the image.
//! * `--store`: `file` (a directory under the work directory), `azurite:http://127.0.0.1:PORT`
//!   (Azurite's development account; the servers create the container) or
//!   `s3:http://127.0.0.1:PORT` (moto: the bucket is made with an unsigned PUT, which moto
//!   accepts). Only loopback endpoints are taken: this measures the servers, not a network.
//! * The server-death figure needs VM leases; in a build without them it reports
//!   "not available: leases not in this build" instead of a number.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::changes::{write_log, DonorPages, LogSpec, Pattern};
use super::images::{self, DistinctImage, PrefixImage};
use super::procstat::{clock_ticks_per_second, cpu_ticks, peak_rss_kib};
use super::report::{self, Figure};
use super::server::{quick_backoff, SpawnedServer, DISK};
use super::{io_err, parse_size_arg, BenchError};
use crate::agent::protect::{protect, DiskSource, ProtectOptions};
use crate::agent::replicate::{replicate, ReplicateOptions};
use crate::format::hrl::Guid;
use crate::format::image::DiskImage;
use crate::wire::Credentials;

#[derive(clap::Args, Debug, Clone)]
pub struct ScaleArgs {
    #[command(flatten)]
    pub image: images::ImageArgs,
    /// Where the shared vault lives: file, azurite:http://127.0.0.1:PORT or
    /// s3:http://127.0.0.1:PORT (moto). Loopback endpoints only.
    #[arg(long, default_value = "file", value_parser = parse_store)]
    pub store: StoreSpec,
    /// The server counts to measure aggregate ingest with, each on a fresh vault.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub servers: Vec<usize>,
    /// Agents (one VM with one disk each) in the aggregate-ingest rows; the same for every
    /// server count, so every row moves the same data.
    #[arg(long, default_value_t = 6)]
    pub agents: usize,
    /// Disk bytes each agent's change log writes (default: an eighth of the disk).
    #[arg(long, value_parser = parse_size_arg)]
    pub log_size: Option<u64>,
    /// Agents spread over --fleet-servers servers in the fleet figure.
    #[arg(long, default_value_t = 64)]
    pub fleet_agents: usize,
    /// Servers of the fleet figure and of the server-death figure.
    #[arg(long, default_value_t = 3)]
    pub fleet_servers: usize,
    /// Agents on one server, the fleet figure's baseline.
    #[arg(long, default_value_t = 16)]
    pub single_agents: usize,
    /// Disk size of each agent in the fleet and server-death figures (a prefix of the image).
    #[arg(long, default_value = "32MiB", value_parser = parse_size_arg)]
    pub fleet_size: u64,
    /// Skip the fleet figure (64 agents on 3 servers against 16 on one).
    #[arg(long)]
    pub no_fleet: bool,
    /// Skip the server-death figure.
    #[arg(long)]
    pub no_death: bool,
    /// The lease TTL the servers run with in the server-death figure, seconds.
    #[arg(long, default_value_t = 30)]
    pub lease_ttl: u64,
    /// Block uploads in flight per agent (as `agent protect --parallel`).
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Measured rounds; figures are medians (peak RSS: the maximum).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Print one JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Where the vault of a row lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    File,
    /// Azurite's blob endpoint with the account in the path.
    Azurite {
        endpoint: String,
    },
    /// An S3 endpoint that accepts unsigned bucket creation (moto).
    S3 {
        endpoint: String,
    },
}

/// Azurite's documented development account and key (public, fixed).
const AZURITE_ACCOUNT: &str = super::page_blobs::EMULATOR_ACCOUNT;
const AZURITE_KEY: &str = super::page_blobs::EMULATOR_KEY;

/// clap value parser of `--store`.
pub fn parse_store(s: &str) -> Result<StoreSpec, String> {
    if s == "file" {
        return Ok(StoreSpec::File);
    }
    let (kind, endpoint) = s.split_once(':').ok_or_else(|| {
        format!("{s:?}: use file, azurite:http://127.0.0.1:PORT or s3:http://127.0.0.1:PORT")
    })?;
    let url = reqwest::Url::parse(endpoint).map_err(|e| format!("{endpoint:?}: {e}"))?;
    let host = url.host_str().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if !loopback {
        return Err(format!(
            "{endpoint}: only a loopback endpoint (127.0.0.1, ::1, localhost) is measured"
        ));
    }
    let base = endpoint.trim_end_matches('/').to_string();
    match kind {
        "azurite" => Ok(StoreSpec::Azurite {
            endpoint: if url.path().trim_matches('/').is_empty() {
                format!("{base}/{AZURITE_ACCOUNT}")
            } else {
                base
            },
        }),
        "s3" => Ok(StoreSpec::S3 { endpoint: base }),
        other => Err(format!("store kind {other:?}: use file, azurite or s3")),
    }
}

impl StoreSpec {
    fn describe(&self) -> String {
        match self {
            StoreSpec::File => "file:// (a local directory)".into(),
            StoreSpec::Azurite { endpoint } => format!("Azurite at {endpoint}"),
            StoreSpec::S3 { endpoint } => format!("S3 (moto) at {endpoint}"),
        }
    }

    /// The `[vault]` section of a fresh vault named `name` (a directory under `run_dir`, a
    /// container or a bucket), made ready where the servers cannot do it themselves.
    async fn vault_section(
        &self,
        run_dir: &Path,
        name: &str,
        key_file: &Path,
    ) -> Result<String, BenchError> {
        let key = format!(
            "master_key_file = {}\n",
            toml_str(&key_file.display().to_string())
        );
        Ok(match self {
            StoreSpec::File => {
                let dir = run_dir.join("vault");
                std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
                format!(
                    "[vault]\nurl = {}\n{key}",
                    toml_str(&format!("file://{}", dir.display()))
                )
            }
            StoreSpec::Azurite { endpoint } => format!(
                "[vault]\nurl = {}\ncreate_container = true\n{key}\n[vault.options]\n\
                 azure_storage_account_name = {}\nazure_storage_account_key = {}\n\
                 azure_storage_endpoint = {}\nazure_allow_http = \"true\"\n",
                toml_str(&format!("az://{name}")),
                toml_str(AZURITE_ACCOUNT),
                toml_str(AZURITE_KEY),
                toml_str(endpoint)
            ),
            StoreSpec::S3 { endpoint } => {
                let url = format!("{endpoint}/{name}");
                let resp = reqwest::Client::new()
                    .put(&url)
                    .send()
                    .await
                    .map_err(|e| BenchError::Server(format!("creating bucket {url}: {e}")))?;
                if !resp.status().is_success() {
                    return Err(BenchError::Server(format!(
                        "creating bucket {url}: {} (an S3 that needs signed bucket creation: make it yourself)",
                        resp.status()
                    )));
                }
                format!(
                    "[vault]\nurl = {}\n{key}\n[vault.options]\naws_endpoint = {}\n\
                     aws_allow_http = \"true\"\naws_virtual_hosted_style_request = \"false\"\n\
                     aws_access_key_id = \"testing\"\naws_secret_access_key = \"testing\"\n\
                     aws_region = \"us-east-1\"\n",
                    toml_str(&format!("s3://{name}")),
                    toml_str(endpoint)
                )
            }
        })
    }
}

/// A TOML basic string (JSON's escaping is valid TOML).
fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// One aggregate-ingest measurement.
#[derive(Debug, Clone, Serialize)]
pub struct IngestRun {
    pub servers: usize,
    pub agents: usize,
    pub wall_s: f64,
    /// Disk bytes of the initial replications plus the bytes the change logs write.
    pub logical_bytes: u64,
    pub mb_s: f64,
    /// utime+stime of every server, summed.
    pub server_cpu_s: f64,
    pub server_cpu_s_per_gb: f64,
    /// Peak RSS of each server, in start order.
    pub peak_rss_mib: Vec<f64>,
}

/// One server-death measurement.
#[derive(Debug, Clone, Serialize)]
pub struct DeathRun {
    pub servers: usize,
    pub lease_ttl_s: u64,
    /// VMs the killed server replicated.
    pub vms: usize,
    /// Seconds from the SIGKILL to the last of its VMs' points accepted elsewhere.
    pub recovered_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub store: String,
    pub image: report::ImageInfo,
    pub agents: usize,
    pub load_average: String,
    pub ingest: Vec<IngestRun>,
    pub fleet: Vec<IngestRun>,
    pub death: Vec<DeathRun>,
    /// Why the server-death figure has no number, when it has none.
    pub death_status: String,
    pub figures: Vec<Figure>,
    pub notes: Vec<String>,
}

/// What every measurement needs.
struct Ctx {
    exe: PathBuf,
    work: PathBuf,
    image_path: PathBuf,
    image: Arc<dyn DiskImage>,
    donor: DonorPages,
    tick: f64,
    store: StoreSpec,
    parallel: usize,
    log_size: Option<u64>,
    tag: String,
}

pub async fn run(args: ScaleArgs) -> Result<i32, BenchError> {
    validate(&args)?;
    let load_at_start = super::load_average();
    let prepared = images::prepare(&args.image).await?;
    images::warm_page_cache(&prepared.path)?;
    let donor = DonorPages::sample(prepared.image.as_ref(), 1024, 0x0073_6361_6c65)?;
    let ctx = Ctx {
        exe: std::env::current_exe().map_err(io_err("locating", Path::new("this binary")))?,
        work: prepared.work.clone(),
        image_path: prepared.path.clone(),
        image: prepared.image.clone(),
        donor,
        tick: clock_ticks_per_second() as f64,
        store: args.store.clone(),
        parallel: args.parallel,
        log_size: args.log_size,
        tag: super::server::run_tag(),
    };
    let fleet_image: Arc<dyn DiskImage> =
        Arc::new(PrefixImage::new(ctx.image.clone(), args.fleet_size));

    let mut ingest = Vec::new();
    let mut fleet = Vec::new();
    let mut death = Vec::new();
    let death_status = if args.no_death {
        "not run (--no-death)".to_string()
    } else if !leases_in_build() {
        "not available: leases not in this build".to_string()
    } else {
        String::new()
    };
    for k in 0..args.runs {
        // Interleaved, so drift on a shared machine hits every row of a round alike.
        for &n in &args.servers {
            eprintln!(
                "bench: round {}/{}: {} agents on {n} server(s)",
                k + 1,
                args.runs,
                args.agents
            );
            let label = format!("r{k}-n{n}");
            ingest.push(ingest_once(&ctx, n, args.agents, ctx.image.clone(), &label).await?);
        }
        if !args.no_fleet {
            eprintln!(
                "bench: round {}/{}: fleet, {} agents on {} servers, {} on one",
                k + 1,
                args.runs,
                args.fleet_agents,
                args.fleet_servers,
                args.single_agents
            );
            let label = format!("r{k}-fleet");
            fleet.push(
                ingest_once(
                    &ctx,
                    args.fleet_servers,
                    args.fleet_agents,
                    fleet_image.clone(),
                    &label,
                )
                .await?,
            );
            let label = format!("r{k}-single");
            fleet
                .push(ingest_once(&ctx, 1, args.single_agents, fleet_image.clone(), &label).await?);
        }
        if death_status.is_empty() {
            eprintln!("bench: round {}/{}: server death", k + 1, args.runs);
            let label = format!("r{k}-death");
            death.push(death_once(&ctx, &args, fleet_image.clone(), &label).await?);
        }
    }
    let fleet_disk = args.fleet_size.min(ctx.image.virtual_size());
    let mut r = build(
        &args,
        ctx.store.describe(),
        fleet_disk,
        prepared.info,
        Runs {
            ingest,
            fleet,
            death,
            death_status,
        },
    );
    r.notes.push(super::load_note(&load_at_start));
    if args.json {
        println!("{}", report::json(&r)?);
    } else {
        let heading = vec![
            format!(
                "drvault bench scale: {} agents with one {} disk each, vault on {}",
                r.agents,
                crate::util::human_bytes(ctx.image.virtual_size()),
                r.store
            ),
            format!("image: {} ({})", r.image.path, r.image.source),
        ];
        print!("{}", report::figures_table(&heading, &r.figures, &r.notes));
    }
    Ok(0)
}

fn validate(args: &ScaleArgs) -> Result<(), BenchError> {
    let max = super::ingest::MAX_AGENTS;
    if args.servers.is_empty() || args.servers.iter().any(|&n| n == 0 || n > 16) {
        return Err(BenchError::Invalid(format!(
            "--servers {:?}: each count must be 1-16",
            args.servers
        )));
    }
    for (flag, n) in [
        ("--agents", args.agents),
        ("--fleet-agents", args.fleet_agents),
        ("--single-agents", args.single_agents),
    ] {
        if n == 0 || n > max {
            return Err(BenchError::Invalid(format!("{flag} {n}: must be 1-{max}")));
        }
    }
    if args.fleet_servers < 2 || args.fleet_servers > 16 {
        return Err(BenchError::Invalid(format!(
            "--fleet-servers {}: must be 2-16 (one server is the baseline; the death figure kills one)",
            args.fleet_servers
        )));
    }
    if args.runs == 0 || args.parallel == 0 || args.lease_ttl == 0 {
        return Err(BenchError::Invalid(
            "--runs, --parallel and --lease-ttl must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Whether this build's server takes a `[cluster]` section: the VM leases come with it.
pub fn leases_in_build() -> bool {
    crate::config::Config::parse("[cluster]\nlease_ttl_s = 30\n", "probe").is_ok()
}

/// Servers sharing one fresh vault, and the credentials of the hosts registered on the first.
struct Cluster {
    run_dir: PathBuf,
    servers: Vec<Option<SpawnedServer>>,
    hosts: Vec<Credentials>,
}

impl Cluster {
    /// Starts server 0, registers `hosts` hosts on it, then starts the other `n - 1`.
    async fn start(
        ctx: &Ctx,
        label: &str,
        n: usize,
        hosts: usize,
        extra_config: &str,
    ) -> Result<Cluster, BenchError> {
        let run_dir = ctx.work.join("runs").join(format!("scale-{label}"));
        let _ = std::fs::remove_dir_all(&run_dir);
        let shared = run_dir.join("shared");
        std::fs::create_dir_all(&shared).map_err(io_err("creating", &shared))?;
        let key_file = shared.join("master.key");
        crate::chunk::keys::KeyRing::create_file(&key_file)
            .map_err(|e| BenchError::Server(format!("master key {}: {e}", key_file.display())))?;
        let (cert, key) = (shared.join("cert.pem"), shared.join("key.pem"));
        crate::api::tls::generate_self_signed(&cert, &key)
            .map_err(|e| BenchError::Server(format!("TLS certificate: {e}")))?;
        // Container and bucket names: lowercase letters, digits and hyphens.
        let vault_name = format!("scale-{}-{label}", ctx.tag).to_ascii_lowercase();
        let vault = ctx
            .store
            .vault_section(&run_dir, &vault_name, &key_file)
            .await?;
        // [server] and [cluster] first: the vault section may end inside [vault.options].
        let config = format!(
            "[server]\ntls_cert = {}\ntls_key = {}\n{extra_config}\n{vault}",
            toml_str(&cert.display().to_string()),
            toml_str(&key.display().to_string())
        );
        let config_path = run_dir.join("server.toml");
        std::fs::write(&config_path, config).map_err(io_err("writing", &config_path))?;
        let mut c = Cluster {
            run_dir,
            servers: Vec::with_capacity(n),
            hosts: Vec::with_capacity(hosts),
        };
        c.spawn(ctx, &config_path).await?;
        if let Some(first) = c.servers.first().and_then(Option::as_ref) {
            for h in 0..hosts {
                c.hosts.push(first.add_host(&format!("h{h:03}")).await?);
            }
        }
        while c.servers.len() < n {
            c.spawn(ctx, &config_path).await?;
        }
        Ok(c)
    }

    async fn spawn(&mut self, ctx: &Ctx, config: &Path) -> Result<(), BenchError> {
        let dir = self.run_dir.join(format!("s{}", self.servers.len()));
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let s = SpawnedServer::start(
            &ctx.exe,
            &dir.join("data"),
            &dir.join("server.log"),
            Some(config),
        )
        .await?;
        self.servers.push(Some(s));
        Ok(())
    }

    fn live(&self) -> impl Iterator<Item = (usize, &SpawnedServer)> {
        self.servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    fn url(&self, i: usize) -> Result<String, BenchError> {
        self.servers
            .get(i)
            .and_then(Option::as_ref)
            .map(|s| s.url.clone())
            .ok_or_else(|| BenchError::Server(format!("server {i} is not running")))
    }

    /// Host `k`'s credentials, sent to server `to`.
    fn creds(&self, k: usize, to: usize) -> Result<Credentials, BenchError> {
        let mut c = self
            .hosts
            .get(k)
            .cloned()
            .ok_or_else(|| BenchError::Invalid(format!("no host {k}")))?;
        c.server = self.url(to)?;
        Ok(c)
    }

    /// Stops every server still running and removes the row's directory.
    async fn finish(self) -> Result<(), BenchError> {
        let mut first_err = None;
        for s in self.servers.into_iter().flatten() {
            if let Err(e) = s.stop().await {
                first_err.get_or_insert(e);
            }
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        first_err.map_or(Ok(()), Err)
    }
}

/// One agent's VM: its client, disk and the change log of its cycle 1.
struct AgentVm {
    client: crate::client::Client,
    source: DiskSource,
    opts: ProtectOptions,
    log: PathBuf,
    log_bytes: u64,
}

fn agent_vm(
    ctx: &Ctx,
    creds: &Credentials,
    image: &Arc<dyn DiskImage>,
    k: usize,
    log_dir: &Path,
) -> Result<AgentVm, BenchError> {
    let vm = format!("scale-{}-{k}", ctx.tag);
    let client = crate::agent::client_for(creds, None).map_err(|e| BenchError::Agent {
        vm: vm.clone(),
        source: Box::new(e),
    })?;
    let salt =
        u8::try_from(k + 1).map_err(|_| BenchError::Invalid(format!("agent {k}: too many")))?;
    let img: Arc<dyn DiskImage> = Arc::new(DistinctImage::new(image.clone(), salt)?);
    let size = image.virtual_size();
    let log = log_dir.join(format!("a{k}.hrl"));
    let spec = LogSpec {
        pattern: Pattern::Mixed,
        bytes: ctx.log_size.unwrap_or(size / 8).min(size),
        disk_size: size,
        previous: Guid::NIL,
        unique: Guid::new_random(),
        data_write: Guid::new_random(),
        donor: &ctx.donor,
    };
    let written = write_log(&log, &spec, 0x5ca1e ^ k as u64)?;
    Ok(AgentVm {
        client,
        source: DiskSource {
            id: DISK.into(),
            path: ctx.image_path.clone(),
            image: img,
        },
        opts: ProtectOptions {
            vm,
            generation: 2,
            cpus: 2,
            memory_mib: 2048,
            nics: Vec::new(),
            policy: None,
            parallel: ctx.parallel,
            backoff: quick_backoff(),
            progress: false,
            upload_latencies: None,
            throttle: None,
        },
        log,
        log_bytes: written.data_bytes,
    })
}

/// Protects the VM (initial replication), then sends its cycle-1 log.
async fn replicate_vm(a: &AgentVm) -> Result<(), BenchError> {
    let agent_err = |e| BenchError::Agent {
        vm: a.opts.vm.clone(),
        source: Box::new(e),
    };
    protect(&a.client, std::slice::from_ref(&a.source), &a.opts)
        .await
        .map_err(agent_err)?;
    replicate(&a.client, &a.log, &cycle_opts(&a.opts.vm, 1))
        .await
        .map_err(agent_err)?;
    Ok(())
}

fn cycle_opts(vm: &str, cycle: u64) -> ReplicateOptions {
    ReplicateOptions {
        vm: vm.to_string(),
        disk: DISK.into(),
        cycle: Some(cycle),
        app_consistent: false,
        final_log: false,
        backoff: quick_backoff(),
    }
}

/// `agents` agents replicate through `n` servers on one fresh vault (agent k through server
/// k mod n).
async fn ingest_once(
    ctx: &Ctx,
    n: usize,
    agents: usize,
    image: Arc<dyn DiskImage>,
    label: &str,
) -> Result<IngestRun, BenchError> {
    let cluster = Cluster::start(ctx, label, n, agents, "").await?;
    let result = drive(ctx, &cluster, n, agents, &image).await;
    let finished = cluster.finish().await;
    let run = result?;
    finished?;
    Ok(run)
}

/// One VM per agent, agent k sent through server k mod `n`.
fn agent_vms(
    ctx: &Ctx,
    cluster: &Cluster,
    n: usize,
    agents: usize,
    image: &Arc<dyn DiskImage>,
) -> Result<Vec<AgentVm>, BenchError> {
    let log_dir = cluster.run_dir.join("logs");
    std::fs::create_dir_all(&log_dir).map_err(io_err("creating", &log_dir))?;
    (0..agents)
        .map(|k| agent_vm(ctx, &cluster.creds(k, k % n)?, image, k, &log_dir))
        .collect()
}

async fn drive(
    ctx: &Ctx,
    cluster: &Cluster,
    n: usize,
    agents: usize,
    image: &Arc<dyn DiskImage>,
) -> Result<IngestRun, BenchError> {
    let vms = agent_vms(ctx, cluster, n, agents, image)?;
    let pids: Vec<String> = cluster.live().map(|(_, s)| s.pid.to_string()).collect();
    let cpu0 = server_ticks(&pids)?;
    let t0 = Instant::now();
    let results = futures_util::future::join_all(vms.iter().map(replicate_vm)).await;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = server_ticks(&pids)?.saturating_sub(cpu0) as f64 / ctx.tick;
    let peak_rss_mib = pids
        .iter()
        .map(|p| peak_rss_kib(p).map(|k| k as f64 / 1024.0))
        .collect::<Result<Vec<_>, _>>()?;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let logical_bytes =
        image.virtual_size() * agents as u64 + vms.iter().map(|v| v.log_bytes).sum::<u64>();
    let secs = wall.max(1e-9);
    Ok(IngestRun {
        servers: n,
        agents,
        wall_s: wall,
        logical_bytes,
        mb_s: logical_bytes as f64 / secs / 1e6,
        server_cpu_s: cpu,
        server_cpu_s_per_gb: cpu / (logical_bytes as f64 / 1e9).max(1e-12),
        peak_rss_mib,
    })
}

fn server_ticks(pids: &[String]) -> Result<u64, BenchError> {
    pids.iter()
        .try_fold(0u64, |sum, p| Ok(sum + cpu_ticks(p)?.own))
}

/// With `--fleet-servers` servers and two VMs per server protected, SIGKILL the last server
/// and time until each of its VMs has its next log accepted through one of the others.
async fn death_once(
    ctx: &Ctx,
    args: &ScaleArgs,
    image: Arc<dyn DiskImage>,
    label: &str,
) -> Result<DeathRun, BenchError> {
    let n = args.fleet_servers;
    let agents = 2 * n;
    let extra = format!("\n[cluster]\nlease_ttl_s = {}\n", args.lease_ttl);
    let mut cluster = Cluster::start(ctx, label, n, agents, &extra).await?;
    let result = death_measure(ctx, &mut cluster, args, n, agents, &image).await;
    let finished = cluster.finish().await;
    let run = result?;
    finished?;
    Ok(run)
}

async fn death_measure(
    ctx: &Ctx,
    cluster: &mut Cluster,
    args: &ScaleArgs,
    n: usize,
    agents: usize,
    image: &Arc<dyn DiskImage>,
) -> Result<DeathRun, BenchError> {
    let vms = agent_vms(ctx, cluster, n, agents, image)?;
    let log_dir = cluster.run_dir.join("logs");
    futures_util::future::join_all(vms.iter().map(replicate_vm))
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;

    // The victim's VMs send their next cycle once it is dead, each chained to its cycle 1.
    let victim = n - 1;
    let mut next = Vec::new();
    for (k, v) in vms.iter().enumerate().filter(|(k, _)| k % n == victim) {
        let size = image.virtual_size();
        let prev = crate::agent::replicate::log_header(&v.log).map_err(|e| BenchError::Agent {
            vm: v.opts.vm.clone(),
            source: Box::new(e),
        })?;
        let log = log_dir.join(format!("a{k}-c2.hrl"));
        let spec = LogSpec {
            pattern: Pattern::Scattered,
            bytes: (size / 64).max(4096),
            disk_size: size,
            previous: prev.unique_id,
            unique: Guid::new_random(),
            data_write: prev.vhd2_data_write_guid,
            donor: &ctx.donor,
        };
        write_log(&log, &spec, 0xdead ^ k as u64)?;
        next.push((k, v.opts.vm.clone(), log));
    }
    let survivors: Vec<usize> = (0..n).filter(|&i| i != victim).collect();
    let mut urls = Vec::new();
    for &i in &survivors {
        urls.push(cluster.url(i)?);
    }
    let mut waiting = Vec::new();
    for (k, vm, log) in next {
        waiting.push((cluster.creds(k, survivors[0])?, vm, log));
    }
    if let Some(s) = cluster.servers.get_mut(victim).and_then(Option::take) {
        s.kill().await;
    }
    let t0 = Instant::now();
    let deadline = Duration::from_secs(args.lease_ttl * 10 + 60);
    let urls = &urls;
    let waits = waiting.into_iter().map(|(mut creds, vm, log)| async move {
        let mut attempt = 0usize;
        loop {
            creds.server = urls[attempt % urls.len()].clone();
            let client = crate::agent::client_for(&creds, None).map_err(|e| BenchError::Agent {
                vm: vm.clone(),
                source: Box::new(e),
            })?;
            let mut opts = cycle_opts(&vm, 2);
            // One quick try per server, then the next: the agent's own URL list does the same
            // with real back-off.
            opts.backoff.give_up_after = Duration::from_millis(500);
            match replicate(&client, &log, &opts).await {
                Ok(_) => return Ok::<f64, BenchError>(t0.elapsed().as_secs_f64()),
                Err(e) if t0.elapsed() > deadline => {
                    return Err(BenchError::Server(format!(
                        "{vm}: no server took its log within {} s of the kill: {e}",
                        deadline.as_secs()
                    )))
                }
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let times = futures_util::future::join_all(waits)
        .await
        .into_iter()
        .collect::<Result<Vec<f64>, _>>()?;
    Ok(DeathRun {
        servers: n,
        lease_ttl_s: args.lease_ttl,
        vms: times.len(),
        recovered_s: times.into_iter().fold(0.0, f64::max),
    })
}

/// Every measurement of an invocation.
struct Runs {
    ingest: Vec<IngestRun>,
    fleet: Vec<IngestRun>,
    death: Vec<DeathRun>,
    death_status: String,
}

fn build(
    args: &ScaleArgs,
    store: String,
    fleet_disk: u64,
    image: report::ImageInfo,
    runs: Runs,
) -> ScaleReport {
    let Runs {
        ingest,
        fleet,
        death,
        death_status,
    } = runs;
    let base_n = if args.servers.contains(&1) {
        1
    } else {
        args.servers.first().copied().unwrap_or(1)
    };
    let of = |n: usize| ingest.iter().filter(move |r| r.servers == n);
    let base_mb: Vec<Option<f64>> = of(base_n).map(|r| Some(r.mb_s)).collect();
    let base_cpu: Vec<Option<f64>> = of(base_n).map(|r| Some(r.server_cpu_s_per_gb)).collect();
    let base_what = format!("{base_n} server, same run");
    let mut figures = Vec::new();
    let mut seen = Vec::new();
    for &n in &args.servers {
        if seen.contains(&n) {
            continue;
        }
        seen.push(n);
        let mb: Vec<f64> = of(n).map(|r| r.mb_s).collect();
        let cpu: Vec<f64> = of(n).map(|r| r.server_cpu_s_per_gb).collect();
        figures.push(Figure::new(
            &format!("aggregate MB/s, {n} server(s)"),
            &mb,
            &base_mb,
            &base_what,
        ));
        figures.push(Figure::new(
            &format!("server CPU s/GB (sum), {n} server(s)"),
            &cpu,
            &base_cpu,
            &base_what,
        ));
        for i in 0..n {
            let rss: Vec<f64> = of(n)
                .filter_map(|r| r.peak_rss_mib.get(i).copied())
                .collect();
            figures.push(peak(
                &format!("peak RSS MiB, server {} of {n}", i + 1),
                &rss,
            ));
        }
    }
    let mut notes = vec![format!(
        "each row: {} agents, one VM with one disk each: initial replication, then one change log; agent k through server k mod N, on a fresh vault",
        args.agents
    )];
    if !args.no_fleet {
        let spread: Vec<&IngestRun> = fleet
            .iter()
            .filter(|r| r.servers == args.fleet_servers)
            .collect();
        let single: Vec<&IngestRun> = fleet.iter().filter(|r| r.servers == 1).collect();
        let mb: Vec<f64> = spread.iter().map(|r| r.mb_s).collect();
        let base: Vec<Option<f64>> = single.iter().map(|r| Some(r.mb_s)).collect();
        figures.push(Figure::new(
            &format!(
                "fleet MB/s, {} agents on {} servers",
                args.fleet_agents, args.fleet_servers
            ),
            &mb,
            &base,
            &format!("{} agents on 1 server", args.single_agents),
        ));
        let worst: Vec<f64> = spread
            .iter()
            .map(|r| r.peak_rss_mib.iter().copied().fold(0.0, f64::max))
            .collect();
        figures.push(peak(
            &format!(
                "fleet peak RSS MiB, largest of {} servers",
                args.fleet_servers
            ),
            &worst,
        ));
        let single_rss: Vec<f64> = single
            .iter()
            .filter_map(|r| r.peak_rss_mib.first().copied())
            .collect();
        figures.push(peak(
            &format!("peak RSS MiB, 1 server with {} agents", args.single_agents),
            &single_rss,
        ));
        notes.push(format!(
            "fleet: each agent's disk is {}; the issue asks for the fleet's MB/s within 10% of the single server's and every server's peak RSS under 512 MiB",
            crate::util::human_bytes(fleet_disk)
        ));
    }
    if death_status.is_empty() {
        let secs: Vec<f64> = death.iter().map(|d| d.recovered_s).collect();
        figures.push(Figure::new(
            "seconds from a server's death to all its VMs replicating again",
            &secs,
            &[Some(args.lease_ttl as f64)],
            "lease TTL",
        ));
        notes.push(
            "server death: SIGKILL of one server; the issue's goal is at most 2x the lease TTL"
                .into(),
        );
    } else {
        notes.push(format!("server death: {death_status}"));
    }
    ScaleReport {
        store,
        image,
        agents: args.agents,
        load_average: super::load_average(),
        ingest,
        fleet,
        death,
        death_status,
        figures,
        notes,
    }
}

/// A peak figure: the maximum over the runs, not the median.
fn peak(name: &str, values: &[f64]) -> Figure {
    let max = values.iter().copied().fold(f64::NAN, f64::max);
    let mut f = Figure::alone(name, values);
    f.ours = (!max.is_nan()).then_some(max);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    type Wrap = crate::bench::ArgsWrap<ScaleArgs>;

    fn args(extra: &[&str]) -> ScaleArgs {
        let mut v = vec!["x"];
        v.extend_from_slice(extra);
        Wrap::try_parse_from(v).unwrap().a
    }

    #[test]
    fn defaults_and_argument_checks() {
        let a = args(&[]);
        assert_eq!(a.servers, [1, 2, 3]);
        assert_eq!(a.store, StoreSpec::File);
        assert_eq!(
            (a.fleet_agents, a.fleet_servers, a.single_agents),
            (64, 3, 16)
        );
        assert_eq!(a.lease_ttl, 30);
        assert!(validate(&a).is_ok());
        for bad in [
            &["--servers", "0"][..],
            &["--servers", "1,17"],
            &["--agents", "0"],
            &["--fleet-agents", "256"],
            &["--fleet-servers", "1"],
            &["--runs", "0"],
            &["--lease-ttl", "0"],
        ] {
            assert!(
                matches!(validate(&args(bad)), Err(BenchError::Invalid(_))),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn stores_are_loopback_only() {
        assert_eq!(parse_store("file"), Ok(StoreSpec::File));
        assert_eq!(
            parse_store("azurite:http://127.0.0.1:10000"),
            Ok(StoreSpec::Azurite {
                endpoint: "http://127.0.0.1:10000/devstoreaccount1".into()
            })
        );
        assert_eq!(
            parse_store("azurite:http://127.0.0.1:10000/acct/"),
            Ok(StoreSpec::Azurite {
                endpoint: "http://127.0.0.1:10000/acct".into()
            })
        );
        assert_eq!(
            parse_store("s3:http://[::1]:5000"),
            Ok(StoreSpec::S3 {
                endpoint: "http://[::1]:5000".into()
            })
        );
        assert!(parse_store("s3:http://10.0.0.5:9000")
            .unwrap_err()
            .contains("loopback"));
        assert!(parse_store("s3:https://s3.amazonaws.com")
            .unwrap_err()
            .contains("loopback"));
        assert!(parse_store("gcs:http://127.0.0.1:1")
            .unwrap_err()
            .contains("store kind"));
        assert!(parse_store("az://c").is_err());
        assert!(parse_store("memory").is_err());
    }

    #[test]
    fn rows_are_compared_with_the_one_server_row() {
        let a = args(&["--servers", "1,3", "--no-fleet", "--no-death"]);
        let run = |servers: usize, mb_s: f64, cpu: f64| IngestRun {
            servers,
            agents: 6,
            wall_s: 1.0,
            logical_bytes: 1,
            mb_s,
            server_cpu_s: 1.0,
            server_cpu_s_per_gb: cpu,
            peak_rss_mib: (0..servers).map(|i| 100.0 + i as f64).collect(),
        };
        let r = build(
            &a,
            "file".into(),
            1 << 20,
            report::ImageInfo::given(Path::new("i.img")),
            Runs {
                ingest: vec![run(1, 100.0, 4.0), run(3, 90.0, 5.0)],
                fleet: Vec::new(),
                death: Vec::new(),
                death_status: "not run (--no-death)".into(),
            },
        );
        let fig = |name: &str| {
            r.figures
                .iter()
                .find(|f| f.figure == name)
                .unwrap_or_else(|| panic!("no figure {name}"))
        };
        let three = fig("aggregate MB/s, 3 server(s)");
        assert_eq!((three.ours, three.baseline), (Some(90.0), Some(100.0)));
        assert_eq!(three.ratio, Some(0.9));
        assert_eq!(fig("server CPU s/GB (sum), 3 server(s)").ratio, Some(1.25));
        assert_eq!(fig("peak RSS MiB, server 3 of 3").ours, Some(102.0));
        assert!(r.notes.iter().any(|n| n.contains("not run (--no-death)")));
    }
}
