//! `drvault agent run`: the long-running host agent. It protects the VMs of its configuration
//! and keeps them replicated without anyone typing anything:
//!
//! - a VM not yet protected gets protection enabled and its initial replication (resumed where
//!   an earlier run stopped);
//! - then, every policy interval (read from the server each cycle, so a policy change applies
//!   at the next cycle), each disk's [`source::LogSource`] closes the cycle's changes into
//!   MS-HRL logs, which are sent in order and removed once acknowledged; when the policy's
//!   app-consistent frequency is due, the pre-freeze hook runs before the cut and the
//!   post-thaw hook after it (always, even when the cut fails) and the cycle's logs are sent as
//!   app-consistent;
//! - an open resync session (scheduled and inside its window, or active) is run by the agent
//!   itself, then cycles continue on a new log chain;
//! - a recoverable error is retried at the next attempt after the seed's back-off (1, 2, 4, 8,
//!   10 minutes, then every 30, never sooner than the interval); a non-recoverable one stops
//!   that VM, and the heartbeat reports it;
//! - a heartbeat every interval reports backlog and errors; its answer may cap the bandwidth.
//!
//! SIGTERM or SIGINT: no new work starts, an upload in flight is abandoned (the log stays in
//! the source and is sent again, with the same UniqueId, by the next run), the state is already
//! on disk, and the process exits 0.

pub mod config;
pub mod schedule;
pub mod source;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use self::config::{AgentConfig, Connection, DiskConfig, SourceKind, VmConfig};
use self::schedule::Throttle;
use self::source::{ImageDiffSource, LogSource, PendingLog, SourceError, SpoolSource};
use super::backoff::Backoff;
use super::protect::DiskSource;
use super::AgentError;
use crate::client::{Client, ClientError};
use crate::wire::{AgentFault, Heartbeat, LogQuery, VmReport, VmState, VmView};

/// Options of the command line rather than of the configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Multiplies every back-off wait (tests use small values).
    pub backoff_scale: f64,
}

/// Opens the connection the configuration names.
pub fn connect(cfg: &AgentConfig) -> Result<Client, AgentError> {
    Ok(connect_as(cfg)?.compress_uploads(cfg.compress))
}

fn connect_as(cfg: &AgentConfig) -> Result<Client, AgentError> {
    match &cfg.connection {
        Connection::Creds(path) => {
            let creds = super::load_creds(path)?;
            super::client_for(&creds, cfg.host.clone())
        }
        Connection::Direct {
            server,
            token_file,
            ca_cert,
        } => {
            let token = std::fs::read_to_string(token_file).map_err(|e| AgentError::Creds {
                path: token_file.display().to_string(),
                message: e.to_string(),
            })?;
            let ca = match ca_cert {
                Some(p) => Some(std::fs::read_to_string(p).map_err(|e| AgentError::Creds {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?),
                None => None,
            };
            Ok(Client::new(server, token.trim(), ca.as_deref())?.acting_for(cfg.host.clone()))
        }
    }
}

/// What went wrong in a cycle.
#[derive(Debug)]
struct Fault {
    code: String,
    message: String,
    recoverable: bool,
}

impl Fault {
    fn new(code: &str, message: impl Into<String>, recoverable: bool) -> Fault {
        Fault {
            code: code.to_string(),
            message: message.into(),
            recoverable,
        }
    }
}

impl From<SourceError> for Fault {
    fn from(e: SourceError) -> Fault {
        Fault::new(e.code(), e.to_string(), e.recoverable())
    }
}

impl From<ClientError> for Fault {
    fn from(e: ClientError) -> Fault {
        let code = match &e {
            ClientError::Api { body, .. } => body.code.clone(),
            ClientError::Transport(_) => "unreachable".into(),
            ClientError::Decode(_) => "bad_response".into(),
            ClientError::Setup(_) => "client_setup".into(),
        };
        Fault {
            recoverable: e.recoverable(),
            message: e.to_string(),
            code,
        }
    }
}

impl From<AgentError> for Fault {
    fn from(e: AgentError) -> Fault {
        match e {
            AgentError::Client(c) => c.into(),
            AgentError::GaveUp { last, .. } => {
                let mut f: Fault = last.into();
                f.recoverable = true;
                f
            }
            other => Fault::new("agent", other.to_string(), false),
        }
    }
}

/// What every task shares.
struct Shared {
    client: Client,
    throttle: Arc<Throttle>,
    reports: Mutex<BTreeMap<String, VmReport>>,
    backoff_scale: f64,
}

impl Shared {
    fn report(&self, vm: &str, f: impl FnOnce(&mut VmReport)) {
        let mut r = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        let entry = r.entry(vm.to_string()).or_insert_with(|| VmReport {
            vm: vm.to_string(),
            replicating: true,
            disks: Vec::new(),
            last_error: None,
            last_cycle_unix: None,
        });
        f(entry)
    }
}

/// Runs until SIGTERM or SIGINT. Everything local is checked first (every disk opens as its
/// format says, the state directory is writable), so a bad configuration sends nothing.
pub async fn run(cfg: AgentConfig, opts: RunOptions) -> Result<(), AgentError> {
    let mut opened: Vec<(VmConfig, Vec<DiskSource>)> = Vec::new();
    for vm in &cfg.vms {
        let mut disks = Vec::new();
        for d in &vm.disks {
            disks.push(super::protect::open_disk(
                &d.path,
                Some(d.id.clone()),
                d.format,
            )?);
        }
        opened.push((vm.clone(), disks));
    }
    for vm in &cfg.vms {
        let dir = cfg.state_dir.join(&vm.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Invalid(format!("state directory {}: {e}", dir.display())))?;
    }
    let client = connect(&cfg)?;
    let shared = Arc::new(Shared {
        client,
        throttle: Arc::new(Throttle::new(cfg.bandwidth.clone())),
        reports: Mutex::new(BTreeMap::new()),
        backoff_scale: opts.backoff_scale,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for (vm, disks) in opened {
        shared.report(&vm.name, |_| {});
        let dir = cfg.state_dir.join(&vm.name);
        tasks.spawn(vm_worker(shared.clone(), vm, disks, dir, stop_rx.clone()));
    }
    let heartbeat_s = cfg.heartbeat_s.unwrap_or_else(|| {
        cfg.vms
            .iter()
            .filter_map(|v| v.policy.as_ref().map(|p| p.interval_s))
            .min()
            .unwrap_or(30)
            .clamp(1, 300)
    });
    tasks.spawn(heartbeat_loop(shared.clone(), heartbeat_s, stop_rx.clone()));
    tracing::info!(vms = cfg.vms.len(), heartbeat_s, "agent running");
    wait_for_signal().await;
    tracing::info!("stopping: no new work starts, uploads in flight are abandoned");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves once a stop is asked for.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn heartbeat_loop(sh: Arc<Shared>, every_s: u64, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_secs(every_s);
    let mut warned_missing = false;
    loop {
        let hb = Heartbeat {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            interval_s: every_s,
            vms: sh
                .reports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect(),
        };
        tokio::select! {
            r = within(CALL_TIMEOUT, sh.client.heartbeat(&hb)) => match r {
                Ok(ack) => {
                    sh.throttle.set_cap(ack.throttle_mb_s);
                    warned_missing = false;
                }
                // A server without the heartbeat endpoint: say so once, replication goes on.
                Err(e) if e.code() == Some("no_such_route") => {
                    if !warned_missing {
                        tracing::warn!(error = %e, "the server does not take heartbeats; replicating without them");
                        warned_missing = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; replication goes on"),
            },
            _ = stopped(&mut stop) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Per-VM state kept between runs.
#[derive(Debug, Default, Serialize, Deserialize)]
struct VmRunState {
    /// When the last app-consistent cycle was cut (Unix seconds).
    #[serde(default)]
    last_app_consistent_unix: Option<u64>,
}

struct VmRun {
    cfg: VmConfig,
    disks: Vec<DiskSource>,
    sources: Vec<Box<dyn LogSource>>,
    dir: PathBuf,
    state: VmRunState,
}

impl VmRun {
    fn state_path(&self) -> PathBuf {
        self.dir.join("vm.json")
    }

    fn save(&self) -> Result<(), SourceError> {
        let bytes = serde_json::to_vec(&self.state).map_err(|e| SourceError::Io {
            path: self.state_path().display().to_string(),
            message: e.to_string(),
        })?;
        source::write_atomic(&self.state_path(), &bytes)
    }
}

fn open_sources(
    vm: &VmConfig,
    disks: &[DiskSource],
    dir: &Path,
) -> Result<Vec<Box<dyn LogSource>>, SourceError> {
    vm.disks
        .iter()
        .zip(disks)
        .map(
            |(d, src): (&DiskConfig, &DiskSource)| -> Result<Box<dyn LogSource>, SourceError> {
                Ok(match &d.source {
                    SourceKind::Spool(spool) => Box::new(SpoolSource::open(
                        &d.id,
                        spool,
                        src.image.virtual_size(),
                        dir,
                    )?),
                    SourceKind::ImageDiff => {
                        Box::new(ImageDiffSource::open(&d.id, &d.path, d.format, dir)?)
                    }
                })
            },
        )
        .collect()
}

async fn vm_worker(
    sh: Arc<Shared>,
    cfg: VmConfig,
    disks: Vec<DiskSource>,
    dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    let name = cfg.name.clone();
    let setup = || -> Result<VmRun, SourceError> {
        let sources = open_sources(&cfg, &disks, &dir)?;
        let state = match std::fs::read(dir.join("vm.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => VmRunState::default(),
        };
        Ok(VmRun {
            cfg: cfg.clone(),
            disks: Vec::new(),
            sources,
            dir: dir.clone(),
            state,
        })
    };
    let mut run = match setup() {
        Ok(mut r) => {
            r.disks = disks;
            r
        }
        Err(e) => {
            let f: Fault = e.into();
            tracing::error!(vm = %name, code = %f.code, "{}", f.message);
            record(&sh, &name, &f, false);
            return;
        }
    };
    let backoff = Backoff {
        scale: sh.backoff_scale,
        ..Default::default()
    };
    let mut failures = 0u32;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stopped(&mut stop) => return,
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            r = cycle(&sh, &mut run) => r,
            _ = stopped(&mut stop) => {
                update_backlog(&sh, &mut run);
                return;
            }
        };
        update_backlog(&sh, &mut run);
        match outcome {
            Ok(interval) => {
                failures = 0;
                sh.report(&name, |r| r.last_error = None);
                next = started + interval;
            }
            Err((f, interval)) if f.recoverable => {
                let wait = backoff.delay(failures).max(interval);
                tracing::warn!(vm = %name, code = %f.code, retry_in_s = wait.as_secs_f64(), "{}", f.message);
                record(&sh, &name, &f, true);
                failures += 1;
                next = Instant::now() + wait;
            }
            Err((f, _)) => {
                tracing::error!(vm = %name, code = %f.code, "replication of this VM stopped: {}", f.message);
                record(&sh, &name, &f, false);
                return;
            }
        }
    }
}

fn record(sh: &Shared, vm: &str, f: &Fault, replicating: bool) {
    sh.report(vm, |r| {
        r.replicating = replicating;
        r.last_error = Some(AgentFault {
            code: f.code.clone(),
            message: f.message.clone(),
            recoverable: f.recoverable,
            at_unix: source::unix_now(),
        });
    });
}

fn update_backlog(sh: &Shared, run: &mut VmRun) {
    let backlog: Vec<_> = run.sources.iter_mut().map(|s| s.backlog()).collect();
    sh.report(&run.cfg.name, |r| r.disks = backlog);
}

/// The interval to use when the server could not tell.
const FALLBACK_INTERVAL: Duration = Duration::from_secs(30);

/// One cycle; the answer is the interval until the next (also on error, for the back-off).
async fn cycle(sh: &Shared, run: &mut VmRun) -> Result<Duration, (Fault, Duration)> {
    let vm = run.cfg.name.clone();
    let view = match within(CALL_TIMEOUT, sh.client.agent_vm(&vm)).await {
        // Initial replication is over once every disk is complete (the VM's state follows
        // when the finalize job has run): from then on logs are what is sent, and a second
        // baseline would break the chains already started.
        Ok(v) if all_disks_complete(run, &v) => v,
        Ok(_) => protect(sh, run).await.map_err(|f| (f, FALLBACK_INTERVAL))?,
        Err(e) if e.code() == Some("vm_not_found") => {
            protect(sh, run).await.map_err(|f| (f, FALLBACK_INTERVAL))?
        }
        Err(e) => return Err((e.into(), FALLBACK_INTERVAL)),
    };
    let interval = Duration::from_secs(view.policy.interval_s.max(1));
    let fail = |f: Fault| (f, interval);
    if view.state == VmState::FailedOver {
        return Err(fail(Fault::new(
            "failed_over",
            format!("VM {vm} was failed over and the failover committed: fail back and re-protect"),
            false,
        )));
    }
    if let Some(r) = &view.resync {
        let open = match r.state.as_str() {
            "active" => true,
            "scheduled" => r
                .not_before
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_none_or(|t| t.timestamp() <= chrono::Utc::now().timestamp()),
            _ => false,
        };
        if open {
            resync(sh, run, &view).await.map_err(fail)?;
        } else {
            tracing::info!(vm = %vm, session = %r.session, state = %r.state, "a resync session is open: logs wait for it");
        }
        return Ok(interval);
    }
    if let Some(s) = run.sources.iter().find(|s| !s.has_baseline()) {
        return Err(fail(Fault::new(
            "agent_state_missing",
            format!(
                "disk {} of VM {vm} is protected, but the state directory {} has no record of what was last sent: schedule a resync (`drvault resync --vm {vm} --now`) and the agent rebuilds it",
                s.disk(),
                run.dir.display()
            ),
            false,
        )));
    }
    let policy = &view.policy;
    let now = source::unix_now();
    let app_due = policy.app_consistent_every_s > 0
        && run
            .state
            .last_app_consistent_unix
            .is_none_or(|t| now.saturating_sub(t) >= policy.app_consistent_every_s);
    cut(run, app_due).map_err(fail)?;
    send(sh, run).await.map_err(fail)?;
    sh.report(&vm, |r| r.last_cycle_unix = Some(source::unix_now()));
    Ok(interval)
}

fn all_disks_complete(run: &VmRun, view: &VmView) -> bool {
    run.cfg.disks.iter().all(|d| {
        view.disks
            .iter()
            .any(|v| v.id == d.id && v.state == crate::wire::DiskState::Complete)
    })
}

/// Cuts every disk's logs; on an app-consistent cycle inside the hooks.
fn cut(run: &mut VmRun, app_due: bool) -> Result<(), Fault> {
    let vm = run.cfg.name.clone();
    let cycle = run
        .sources
        .iter()
        .filter_map(|s| s.next_cycle())
        .max()
        .unwrap_or(1);
    let mut app = app_due;
    let timeout = Duration::from_secs(run.cfg.hook_timeout_s);
    if app && !run.cfg.pre_freeze.is_empty() {
        if let Err(e) = run_hook(&run.cfg.pre_freeze, timeout) {
            // The cycle still runs, crash-consistent: an app-consistent point is not worth
            // losing the crash-consistent one.
            tracing::warn!(vm = %vm, error = %e, "pre-freeze hook failed; this cycle is crash-consistent");
            app = false;
        }
    }
    let result = tokio::task::block_in_place(|| {
        for s in run.sources.iter_mut() {
            s.cut(cycle, app)?;
        }
        Ok::<(), SourceError>(())
    });
    // Thaw whatever happened to the freeze and the cut: a guest must never stay frozen.
    if app_due && !run.cfg.post_thaw.is_empty() {
        if let Err(e) = run_hook(&run.cfg.post_thaw, timeout) {
            tracing::warn!(vm = %vm, error = %e, "post-thaw hook failed");
        }
    }
    result?;
    if app {
        run.state.last_app_consistent_unix = Some(source::unix_now());
        run.save()?;
        tracing::info!(vm = %vm, cycle, "app-consistent cycle cut");
    }
    Ok(())
}

/// Runs a hook (argv) to completion within `timeout`; a non-zero exit is an error.
fn run_hook(argv: &[String], timeout: Duration) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut child = std::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{prog}: {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match child.try_wait().map_err(|e| format!("{prog}: {e}"))? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => return Err(format!("{prog} exited with {status}")),
            None if std::time::Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{prog} did not finish within {} s",
                    timeout.as_secs()
                ));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Sends every pending log of every disk, in order; each is removed once acknowledged.
async fn send(sh: &Shared, run: &mut VmRun) -> Result<(), Fault> {
    let vm = run.cfg.name.clone();
    for s in run.sources.iter_mut() {
        let pending = tokio::task::block_in_place(|| s.pending())?;
        for log in pending {
            match put_log(sh, &vm, &log).await {
                Ok(ack) => {
                    tracing::info!(vm = %vm, disk = %log.disk, log = %log.unique_id, cycle = ack.cycle, status = %ack.status, app_consistent = log.app_consistent, "log sent");
                    s.acknowledged(&log)?;
                }
                // Its changes are in the resynchronized replica already: it must go.
                Err(e) if e.code() == Some("log_predates_resync") => {
                    tracing::info!(vm = %vm, disk = %log.disk, log = %log.unique_id, "log predates the resync; dropped");
                    s.acknowledged(&log)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

async fn put_log(
    sh: &Shared,
    vm: &str,
    log: &PendingLog,
) -> Result<crate::wire::LogAck, ClientError> {
    let file = tokio::fs::File::open(&log.path)
        .await
        .map_err(|e| ClientError::Setup(format!("{}: {e}", log.path.display())))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ClientError::Setup(e.to_string()))?
        .len();
    let throttle = sh.throttle.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    let mut upload = sh.client.encode_log(stream, len);
    // The throttle limits the link: it sees the pieces as they go on the wire.
    upload.pieces = upload
        .pieces
        .then(move |piece| {
            let throttle = throttle.clone();
            async move {
                if let Ok(p) = &piece {
                    throttle.take(p.len() as u64).await;
                }
                piece
            }
        })
        .boxed();
    let q = LogQuery {
        cycle: log.cycle,
        app_consistent: log.app_consistent,
        final_log: false,
    };
    // The body may not go faster than the throttle (and 1 MB/s is assumed at least).
    let rate = sh.throttle.rate_bytes_s().unwrap_or(f64::INFINITY).min(1e6);
    let limit = CALL_TIMEOUT + Duration::from_secs_f64(len as f64 / rate);
    within(
        limit,
        sh.client
            .put_log(vm, &log.disk, &log.unique_id.to_string(), &q, upload),
    )
    .await
}

/// How long a request without a large body may go unanswered: an unattended agent must not
/// wait forever on a server that accepted a connection and never answers.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// `call`, or a recoverable error once `limit` has passed without an answer.
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Transport(format!(
            "no answer within {} s",
            limit.as_secs()
        ))),
    }
}

/// Enables protection and runs (or resumes) initial replication. Image-diff sources take
/// their baseline first: a block changed while it is read is then sent again by the first log.
async fn protect(sh: &Shared, run: &mut VmRun) -> Result<VmView, Fault> {
    let vm = run.cfg.name.clone();
    tracing::info!(vm = %vm, "enabling protection / initial replication");
    tokio::task::block_in_place(|| {
        for s in run.sources.iter_mut() {
            s.take_baseline()?;
        }
        Ok::<(), SourceError>(())
    })?;
    let opts = super::protect::ProtectOptions {
        vm: vm.clone(),
        generation: run.cfg.generation,
        cpus: run.cfg.cpus,
        memory_mib: run.cfg.memory_mib,
        nics: run.cfg.nics.clone(),
        policy: run.cfg.policy.clone(),
        parallel: 4,
        // Inside one attempt, short trouble is retried; longer trouble is the cycle's back-off.
        backoff: Backoff {
            scale: sh.backoff_scale,
            give_up_after: Duration::from_secs(600),
        },
        progress: false,
        upload_latencies: None,
        throttle: Some(sh.throttle.clone()),
    };
    let summary = super::protect::protect(&sh.client, &run.disks, &opts).await?;
    tracing::info!(vm = %vm, state = %summary.state, seconds = summary.seconds, "initial replication done");
    Ok(sh.client.agent_vm(&vm).await?)
}

/// Runs the open resync session for the disks it names, then starts new log chains.
async fn resync(sh: &Shared, run: &mut VmRun, view: &VmView) -> Result<(), Fault> {
    let vm = run.cfg.name.clone();
    let Some(brief) = &view.resync else {
        return Ok(());
    };
    tracing::info!(vm = %vm, session = %brief.session, disks = ?brief.disks, "running the resync session");
    let mut commit_cycle = None;
    for (i, d) in run.cfg.disks.clone().iter().enumerate() {
        if !brief.disks.contains(&d.id) {
            continue;
        }
        // The baseline comes first, so that what changes while the resync reads the disk is
        // in the next log. Pending logs go: the resync contains their changes.
        tokio::task::block_in_place(|| run.sources[i].restart_chain(0))?;
        if brief.disks_done.contains(&d.id) {
            continue;
        }
        let opts = super::resync::ResyncOptions {
            vm: vm.clone(),
            disk: d.id.clone(),
            parallel: 4,
            backoff: Backoff {
                scale: sh.backoff_scale,
                give_up_after: Duration::from_secs(600),
            },
            progress: false,
            format: d.format,
        };
        let s = super::resync::resync(&sh.client, &d.path, &opts).await?;
        tracing::info!(vm = %vm, disk = %d.id, differing = s.blocks_differing, bytes = s.bytes_uploaded, state = %s.state, "disk resynchronized");
        commit_cycle = s.cycle.or(commit_cycle);
    }
    // Logs of the new chains follow the cycle the resync committed as.
    let after = match commit_cycle {
        Some(c) => c,
        // Every disk was done by an earlier run: the session still tells its cycle.
        None => match brief.disks.first() {
            Some(d) => sh
                .client
                .resync_view(&vm, d)
                .await
                .ok()
                .and_then(|v| v.commit_cycle)
                .unwrap_or(0),
            None => 0,
        },
    };
    if after > 0 {
        for s in run.sources.iter_mut() {
            tokio::task::block_in_place(|| s.raise_cycle(after + 1))?;
        }
    }
    Ok(())
}
