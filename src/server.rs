//! `drvault serve`: prepare the data directory (first start creates the master key, a
//! self-signed certificate and the operator token), open the vault, load state, and serve the
//! API until SIGINT/SIGTERM.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::api::{self, AppState};
use crate::chunk::{CpuPool, KeyRing};
use crate::config::Config;
use crate::jobs::Jobs;
use crate::store::Store;
use crate::vault::registry::{Registrar, OPERATOR_TOKEN_PREFIX};
use crate::vault::Vault;

/// Written to `<data_dir>/server.json` while the server runs: how the CLI finds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerFile {
    pub url: String,
    pub ca_cert: PathBuf,
    pub pid: u32,
}

pub const SERVER_FILE: &str = "server.json";
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";
/// Held locked (exclusive) by the running server: one server per data directory.
pub const LOCK_FILE: &str = "server.lock";

/// How often a server re-reads the records other servers on the vault change.
const REFRESH_PERIOD: Duration = Duration::from_secs(2);

/// A startup failure, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Key(#[from] crate::chunk::keys::KeyError),
    #[error("{0}")]
    Tls(#[from] crate::api::tls::TlsError),
    #[error("vault: {0}")]
    Vault(#[from] crate::error::Error),
    #[error("{0}")]
    Webhooks(#[from] crate::webhooks::WebhookError),
    #[error("vault store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Faults(#[from] crate::store::faulty::FaultError),
    /// A secret file others can read (the server refuses it like the master key file).
    #[error("{what} {path} has mode {mode:o}: others can read it; it must be readable by its owner only: run `chmod 600 {path}`")]
    Permissions {
        what: &'static str,
        path: String,
        mode: u32,
    },
    #[error(
        "data directory {data_dir} is in use by another drvault serve ({running}): stop it \
         first, or give this server its own --data-dir"
    )]
    InUse { data_dir: String, running: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io_err<'a>(what: &'static str, p: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        what,
        path: p.display().to_string(),
        source,
    }
}

/// Everything a running server is made of, ready to serve.
pub struct Prepared {
    pub state: AppState,
    pub listener: tokio::net::TcpListener,
    pub tls: Arc<rustls::ServerConfig>,
    pub config: Config,
    pub url: String,
    /// The data directory's lock, released when the server has stopped.
    pub lock: std::fs::File,
}

/// Creates what is missing in the data directory and opens everything.
pub async fn prepare(config: Config) -> Result<Prepared, ServeError> {
    let data_dir = config.server.data_dir.clone();
    // The recorder first, so gauges set while loading state are exported.
    let metrics = install_metrics();
    create_private_dir(&data_dir)?;
    let lock = lock_data_dir(&data_dir)?;
    let key_path = config.master_key_path();
    if config.vault.master_key_file.is_none() && !key_path.exists() {
        KeyRing::create_file(&key_path)?;
        println!(
            "created master key      {}  (keep a copy: without it the vault cannot be read)",
            key_path.display()
        );
    }
    let keys =
        Arc::new(KeyRing::load(&key_path)?.with_rotate_after(config.vault.key_rotate_after_seals));
    let url = config.vault_url()?;
    let options: Vec<(String, String)> = config
        .vault
        .options
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if config.vault.create_container {
        let container = url
            .strip_prefix("az://")
            .or_else(|| url.strip_prefix("azure://"))
            .ok_or_else(|| {
                crate::config::ConfigError::Invalid(format!(
                    "vault.create_container applies to az:// vaults, not {url}"
                ))
            })?
            .trim_end_matches('/');
        if crate::store::azure::ensure_vault_container(container, &options).await? {
            println!("created container       {url}");
        }
    }
    let store = Store::open(&url, &options)?;
    // Test-only fault injection (DRVAULT_FAULTS); the store is returned unchanged without it.
    let (store, _faults) = crate::store::faulty::from_env(store)?;
    let cpu = CpuPool::new(config.cpu_threads());
    // Refuses a vault of another key or of a format this release cannot serve; nothing below
    // writes to the vault before this passed.
    let vault = Vault::open(store, keys, cpu, config.vault.zstd_level).await?;

    let (cert, key) = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => {
            let c = data_dir.join("tls").join("cert.pem");
            let k = data_dir.join("tls").join("key.pem");
            if !c.exists() || !k.exists() {
                create_private_dir(&data_dir.join("tls"))?;
                let _ = std::fs::remove_file(&c);
                let _ = std::fs::remove_file(&k);
                api::tls::generate_self_signed(&c, &k)?;
                println!(
                    "created TLS certificate {}  (self-signed for localhost, 127.0.0.1)",
                    c.display()
                );
            }
            (c, k)
        }
        _ => {
            return Err(crate::config::ConfigError::Invalid(
                "server.tls_cert and server.tls_key go together".into(),
            )
            .into())
        }
    };
    check_private_file("TLS private key", &key)?;
    let tls = api::tls::server_config(&cert, &key)?;
    let ca_pem = std::fs::read_to_string(&cert).map_err(io_err("reading certificate", &cert))?;

    // The operator token: generated once, stored in clear only in the data directory (0600),
    // and as a digest in the vault's registry.
    let token_path = data_dir.join(OPERATOR_TOKEN_FILE);
    if token_path.exists() {
        check_private_file("operator token file", &token_path)?;
    }
    let token = match std::fs::read_to_string(&token_path) {
        Ok(t) => t.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let t = crate::util::random_token(OPERATOR_TOKEN_PREFIX);
            write_private(&token_path, t.as_bytes())?;
            println!("created operator token  {}", token_path.display());
            t
        }
        Err(e) => {
            return Err(ServeError::Io {
                what: "reading operator token",
                path: token_path.display().to_string(),
                source: e,
            })
        }
    };
    // Every start check passed: an older vault becomes this release's format before the first
    // write of this server.
    vault.upgrade_format().await?;
    let registry = Registrar::open(vault.records.clone(), vault.keys().clone(), &token).await?;

    let listener = tokio::net::TcpListener::bind(&config.server.listen)
        .await
        .map_err(io_err("binding", Path::new(&config.server.listen)))?;
    let local = listener
        .local_addr()
        .map_err(io_err("binding", Path::new(&config.server.listen)))?;
    let url = config
        .server
        .public_url
        .clone()
        .unwrap_or_else(|| format!("https://{local}"));
    let server_id = crate::cluster::server_id(config.cluster.server_id.as_deref(), &data_dir)
        .map_err(io_err("writing the server id in", &data_dir))?;
    let cluster = crate::cluster::Cluster::new(
        vault.records.clone(),
        server_id,
        config
            .cluster
            .advertise_url
            .clone()
            .unwrap_or_else(|| url.clone()),
        Duration::from_secs(config.cluster.lease_ttl_s),
    );
    // Before anything takes a lease: this server's record, and the others' as they are now.
    cluster.heartbeat().await?;
    // Staging files of writes a killed process never finished: nothing of this process writes
    // yet, so alone on the vault whatever is there belongs to no write in flight. With other
    // servers live, their writes in flight have staging files too: only those older than any
    // write lasts go.
    let cutoff = match cluster.live_peers().is_empty() {
        true => crate::util::unix_now_ms(),
        false => crate::util::unix_now_ms().saturating_sub(crate::scrub::gc::STAGING_MIN_AGE_MS),
    };
    let left = vault
        .store()
        .remove_staging_leftovers(cutoff, false)
        .await?;
    if left.files > 0 {
        tracing::info!(
            files = left.files,
            bytes = left.bytes,
            "removed staging files of interrupted writes"
        );
    }

    let jobs = Jobs::load(vault.records.clone()).await?;
    jobs.set_server(cluster.id());
    // Jobs whose task died with a previous process (a crash) never finish on their own.
    jobs.fail_interrupted().await?;
    let tasks = crate::tasks::Tasks::new();
    let services = crate::services::Services::load(
        vault.clone(),
        jobs.clone(),
        tasks.clone(),
        crate::services::Settings {
            block_size: config.vault.block_size,
            mapped_networks: config.networks().mapped_sources(),
            max_log_bytes: config.ingest.max_log_bytes,
            resync_window: config.resync.window()?,
            health: config.health.settings(),
            cluster: Some(cluster.clone()),
        },
    )
    .await?;
    services.catalog.attach_registry(registry.clone());
    {
        // Disabled VMs whose retention window passed lose their records (their objects are
        // then garbage); checked as often as the background merge, at least every 5 minutes.
        let period = match config.replica.merge_interval_s {
            0 => 300,
            s => s.min(300),
        };
        let c = services.catalog.clone();
        tasks.every("disabled-expiry", Duration::from_secs(period), move || {
            let c = c.clone();
            async move {
                if let Err(e) = c.expire_disabled().await {
                    tracing::warn!(error = %e, "removing expired disabled VMs failed; retried next time");
                }
            }
        });
    }
    if config.replica.merge_interval_s > 0 {
        // Background merge: folds logs that left the retention window into base maps.
        let p = services.replicas.clone();
        tasks.every(
            "merge",
            Duration::from_secs(config.replica.merge_interval_s),
            move || {
                let p = p.clone();
                async move { p.merge_expired_all().await }
            },
        );
    }

    services.contacts.spawn_persist(&tasks);
    jobs.spawn_progress_persist(&tasks);
    cluster.spawn(&tasks);
    {
        // What other servers change: VM and disk records, hosts and accounts.
        let c = services.catalog.clone();
        let r = registry.clone();
        let j = jobs.clone();
        let cl = cluster.clone();
        tasks.every("cluster-jobs-refresh", REFRESH_PERIOD * 5, move || {
            let (j, cl) = (j.clone(), cl.clone());
            async move {
                if cl.live_peers().is_empty() {
                    return;
                }
                if let Err(e) = j.refresh().await {
                    tracing::warn!(error = %e, "reading other servers' jobs failed; retried");
                }
            }
        });
        tasks.every("cluster-refresh", REFRESH_PERIOD, move || {
            let (c, r) = (c.clone(), r.clone());
            async move {
                if let Err(e) = c.refresh().await {
                    tracing::warn!(error = %e, "refreshing records other servers changed failed; retried");
                }
                if let Err(e) = r.refresh().await {
                    tracing::warn!(error = %e, "refreshing the registry failed; retried");
                }
            }
        });
    }
    let failovers = crate::failover::service::Failovers::new(
        vault.clone(),
        services.catalog.clone(),
        services.replicas.clone(),
        jobs.clone(),
        crate::failover::service::FailoverSettings {
            networks: config.networks(),
            output: std::path::absolute(config.failover_dir())
                .unwrap_or_else(|_| config.failover_dir()),
            planned_wait: Duration::from_secs(config.failover.planned_wait_s),
            target: config.failover_target()?,
        },
        tasks.clone(),
    );
    failovers.recover_interrupted().await?;
    let plans = crate::failover::plan::Plans::new(
        vault.clone(),
        services.catalog.clone(),
        services.replicas.clone(),
        jobs.clone(),
        failovers.clone(),
        tasks.clone(),
    );
    let scrub = crate::scrub::Scrub::new(
        vault.clone(),
        services.catalog.clone(),
        services.replicas.clone(),
        services.resyncs.clone(),
        jobs.clone(),
        config.gc.grace_s,
        tasks.clone(),
    );
    let audit = crate::audit::AuditLog::open(vault.clone())
        .await
        .map_err(crate::error::Error::from)?;
    audit.spawn_retry(&tasks);
    scrub.attach_audit(audit.clone());
    scrub.spawn_participant();
    if config.verify.interval_s > 0 {
        scrub.spawn_schedule(Duration::from_secs(config.verify.interval_s));
    }
    if config.gc.interval_s > 0 {
        scrub.spawn_gc_schedule(Duration::from_secs(config.gc.interval_s));
    }
    crate::webhooks::start(&config.webhooks, &jobs, &services.overview, &tasks)?;
    let state = AppState {
        vault,
        catalog: services.catalog,
        ingest: services.ingest,
        replicas: services.replicas,
        resyncs: services.resyncs,
        overview: services.overview,
        contacts: services.contacts,
        jobs,
        failovers,
        plans,
        scrub,
        registry,
        audit,
        ingest_permits: Arc::new(Semaphore::new(config.ingest.max_inflight_blocks)),
        body_budget: api::body_budget::BodyBudget::new(
            config.ingest.body_memory_mib << 20,
            config.ingest.body_memory_per_host_mib << 20,
        ),
        metrics,
        tasks,
        public_url: url.clone(),
        ca_pem,
    };
    let sf = ServerFile {
        url: url.clone(),
        ca_cert: std::path::absolute(&cert).unwrap_or(cert),
        pid: std::process::id(),
    };
    let sf_path = data_dir.join(SERVER_FILE);
    let text = serde_json::to_vec_pretty(&sf).map_err(|e| ServeError::Io {
        what: "encoding",
        path: sf_path.display().to_string(),
        source: e.into(),
    })?;
    std::fs::write(&sf_path, text).map_err(io_err("writing", &sf_path))?;
    Ok(Prepared {
        state,
        listener,
        tls,
        config,
        url,
        lock,
    })
}

/// Takes the data directory's exclusive lock, or says which server holds it. A second server
/// would share the vault's records (cached as if this process were their only writer) and, on
/// stopping, delete the first one's server.json.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, ServeError> {
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    use rustix::fs::{flock, FlockOperation};
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let running = std::fs::read_to_string(data_dir.join(SERVER_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<ServerFile>(&t).ok())
                .map(|sf| format!("pid {}, {}", sf.pid, sf.url))
                .unwrap_or_else(|| "still starting".into());
            Err(ServeError::InUse {
                data_dir: data_dir.display().to_string(),
                running,
            })
        }
        Err(e) => Err(io_err("locking", &path)(e.into())),
    }
}

/// Serves until `shutdown` resolves.
pub async fn run(p: Prepared, shutdown: impl Future<Output = ()>) {
    let limits = p.config.serve_limits();
    let data_dir = p.config.server.data_dir.clone();
    let tasks = p.state.tasks.clone();
    let contacts = p.state.contacts.clone();
    let cluster = p.state.catalog.cluster().clone();
    let app = api::router(p.state, p.config.request_limits());
    let grace = limits.shutdown_grace;
    api::server::serve(p.listener, p.tls, app, limits, shutdown).await;
    // Background work (merges, schedules, failovers) gets the same grace as connections.
    tasks.shutdown(grace).await;
    // The last heartbeats since the previous save: a clean stop loses none.
    if let Err(e) = contacts.persist().await {
        tracing::warn!(error = %e, "could not save the hosts' last heartbeats at shutdown");
    }
    // The other servers take this one's VMs at once instead of after the lease TTL.
    cluster.stop().await;
    let _ = std::fs::remove_file(data_dir.join(SERVER_FILE));
    // Only now may another server take the directory (and write its own server.json).
    drop(p.lock);
}

fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ])
                .ok()?
                .install_recorder()
                .ok()
                .inspect(|_| register_counters())
        })
        .clone()
}

/// Counters a dashboard or alert rule reads, exported at 0 from the start: a series that only
/// appears with its first event reads as "no data" until then, and `rate()` misses that event.
const COUNTERS_FROM_ZERO: &[&str] = &[
    "drvault_blocks_received_total",
    "drvault_blocks_stored_total",
    "drvault_blocks_dedup_total",
    "drvault_blocks_zero_total",
    "drvault_bytes_received_total",
    "drvault_bytes_stored_plain_total",
    "drvault_bytes_stored_sealed_total",
    "drvault_bytes_dedup_total",
    "drvault_bytes_zero_total",
    "drvault_logs_accepted_total",
    "drvault_log_bytes_accepted_total",
    "drvault_gc_freed_objects_total",
    "drvault_gc_freed_bytes_total",
    "drvault_quarantined_objects_total",
    "drvault_audit_write_errors_total",
];

fn register_counters() {
    for name in COUNTERS_FROM_ZERO {
        metrics::counter!(*name).increment(0);
    }
    crate::store::register_metrics();
}

fn create_private_dir(p: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::DirBuilderExt;
    if p.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(io_err("creating directory", p))
}

/// Refuses a secret file that its group or others may read, as the master key file is.
fn check_private_file(what: &'static str, p: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p).map_err(io_err("reading", p))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ServeError::Permissions {
            what,
            path: p.display().to_string(),
            mode,
        });
    }
    Ok(())
}

fn write_private(p: &Path, data: &[u8]) -> Result<(), ServeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .map_err(io_err("creating", p))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(io_err("writing", p))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
