//! Typed server configuration. Every setting has a default, so `drvault serve` runs with no file;
//! `--config FILE` takes a TOML file (see `config/drvault.example.toml` for every setting with
//! comments, and `config/azure.example.toml` for a vault on Azure Blob). Unknown keys are errors,
//! so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::file_formats::{DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub vault: VaultConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub replica: ReplicaConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default)]
    pub resync: ResyncConfig,
    #[serde(default)]
    pub verify: VerifyConfig,
    #[serde(default)]
    pub gc: GcConfig,
    #[serde(default)]
    pub health: HealthConfig,
    /// Several servers on one vault: leases, their TTL, this server's identity (`[cluster]`).
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Target virtual networks (`[[network]]`, see failover::network).
    #[serde(default)]
    pub network: Vec<crate::failover::network::TargetNetwork>,
    /// Source network → target subnet mappings (`[[mapping]]`).
    #[serde(default)]
    pub mapping: Vec<crate::failover::network::Mapping>,
    /// Endpoints told of job outcomes and VM health changes (`[[webhooks]]`).
    #[serde(default)]
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Where failovers write disks and VM definitions; default <data_dir>/failover. Test
    /// failovers (drills) go to a separate `drills/` folder inside it.
    pub output_dir: Option<PathBuf>,
    /// How long a planned failover waits for every disk's final log, seconds.
    pub planned_wait_s: u64,
    /// Where failed-over disks are written instead of `output_dir`: `az://container[/path]`
    /// (page-blob fixed VHDs; VM definitions stay in `output_dir`). Default: none (local files).
    #[serde(default)]
    pub target: Option<String>,
    /// Credentials and endpoint of an `az://` target: the same keys as `[vault] options`
    /// (azure_storage_account_name, azure_storage_account_key, azure_storage_endpoint, ...).
    #[serde(default)]
    pub target_options: BTreeMap<String, String>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            output_dir: None,
            planned_wait_s: 3600,
            target: None,
            target_options: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResyncConfig {
    /// Off-hours window in server local time, `HH:MM-HH:MM` (wrapping past midnight); resyncs
    /// wait for it unless started with `--now`. Empty: start at once.
    pub window: String,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            window: "22:00-06:00".into(),
        }
    }
}

impl ResyncConfig {
    pub fn window(&self) -> Result<Option<crate::replica::resync::Window>, ConfigError> {
        if self.window.trim().is_empty() {
            return Ok(None);
        }
        crate::replica::resync::Window::parse(&self.window)
            .map(Some)
            .map_err(ConfigError::Invalid)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Seconds between scheduled verifies of what was written since the last verify (counted
    /// from the last one); 0 = never (run `drvault verify` by hand).
    pub interval_s: u64,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig { interval_s: 86_400 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// Garbage collection deletes unreferenced objects only when older than this (seconds);
    /// `drvault gc --grace` overrides it per run.
    pub grace_s: u64,
    /// Seconds between scheduled collections, counted from the last one (kept in the vault, so
    /// a restarted server does not start over); 0 = never (run `drvault gc` by hand).
    pub interval_s: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            grace_s: crate::scrub::DEFAULT_GRACE_S,
            interval_s: 86_400,
        }
    }
}

/// `[cluster]`: what lets several `drvault serve` share one vault (see [`crate::cluster`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Seconds a server keeps its VMs' leases without renewing them: when it dies, the other
    /// servers take its VMs over after this long (a shorter TTL fails over sooner and writes
    /// the vault more often: one heartbeat per server every TTL/5).
    pub lease_ttl_s: u64,
    /// This server's name in the vault (default: generated once into `<data_dir>/server.id`).
    pub server_id: Option<String>,
    /// URL the other servers send agents to for the VMs this server holds (default:
    /// `[server] public_url`, else https://<listen>).
    pub advertise_url: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            lease_ttl_s: 30,
            server_id: None,
            advertise_url: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// A host whose agent stopped sending heartbeats makes its VMs Critical ("host not
    /// reporting") after 10 of its heartbeat intervals, but never sooner than this many seconds
    /// (15 minutes, as the seed says). Lower it only for tests and labs, where agents report
    /// every second and waiting 15 minutes proves nothing more.
    pub not_reporting_critical_floor_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            not_reporting_critical_floor_s: crate::overview::HealthSettings::default()
                .not_reporting_critical_floor_s,
        }
    }
}

impl HealthConfig {
    pub fn settings(&self) -> crate::overview::HealthSettings {
        crate::overview::HealthSettings {
            not_reporting_critical_floor_s: self.not_reporting_critical_floor_s,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaConfig {
    /// Seconds between background merges of logs that left each VM's retention window; 0 = never
    /// (run `drvault merge` by hand).
    pub merge_interval_s: u64,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            merge_interval_s: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port (written to `<data_dir>/server.json`).
    pub listen: String,
    /// Where the local vault, master key, certificate and operator token live by default.
    pub data_dir: PathBuf,
    /// PEM certificate chain and private key; generated self-signed in `data_dir/tls` if unset.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// URL agents use to reach this server (goes into credentials files); default https://<listen>.
    pub public_url: Option<String>,
    /// General connection slots: connections served at once (see `api::slots`). When these
    /// and the reserve are all in use, further connections wait in the kernel backlog.
    pub max_connections: usize,
    /// General slots one client address may hold; unset: a quarter of `max_connections`
    /// (rounded up). Further connections from it land on the reserve or are closed.
    pub max_connections_per_address: Option<usize>,
    /// Extra slots used when the general ones are taken (or the address holds its share); they
    /// serve only `/healthz`, the console's files and the operator, one request each.
    pub reserved_connections: usize,
    /// Seconds a connection may stay open with no request in flight (HTTP/1.1 keep-alive and
    /// HTTP/2 alike; HTTP/2 PINGs are not requests); then it is closed gracefully.
    pub idle_timeout_s: u64,
    /// Seconds a client may take to send a request's headers (slowloris guard).
    pub header_read_timeout_s: u64,
    /// Seconds a TLS handshake may take.
    pub tls_handshake_timeout_s: u64,
    /// Slow-body guard: after `body_rate_grace_s` seconds of waiting for a request body, it must
    /// keep arriving at this many bytes per second of waiting or it is cut off; 0 = off.
    pub body_min_rate_bytes_per_s: u64,
    pub body_rate_grace_s: u64,
    /// Longest wait for the next piece of a request body, seconds.
    pub body_idle_timeout_s: u64,
    /// Requests per second per host (token bucket; 429 with Retry-After beyond); 0 = off.
    pub host_rate_per_s: f64,
    /// Requests a host may send in a burst above the rate.
    pub host_rate_burst: f64,
    /// On SIGINT/SIGTERM: seconds to let requests in flight finish before aborting them.
    pub shutdown_grace_s: u64,
    /// Log format: "text" or "json".
    pub log_format: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8443".into(),
            data_dir: PathBuf::from("drvault-data"),
            tls_cert: None,
            tls_key: None,
            public_url: None,
            max_connections: 1024,
            max_connections_per_address: None,
            reserved_connections: 16,
            // Agents send a replication cycle's requests back to back and the console polls
            // every 2 s while a job runs, so a minute keeps every connection in real use;
            // one left idle (a client that went quiet, or one holding slots on purpose) gives
            // its slot back within a minute, and a client that comes back pays one handshake.
            idle_timeout_s: 60,
            header_read_timeout_s: 10,
            tls_handshake_timeout_s: 10,
            body_min_rate_bytes_per_s: 4096,
            body_rate_grace_s: 10,
            body_idle_timeout_s: 60,
            host_rate_per_s: 500.0,
            host_rate_burst: 1000.0,
            shutdown_grace_s: 30,
            log_format: "text".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    /// Object store URL: file:///abs/dir, az://container, s3://bucket; default file://<data_dir>/vault.
    pub url: Option<String>,
    /// Backend options (object_store keys, e.g. azure_storage_account_name, aws_endpoint).
    pub options: BTreeMap<String, String>,
    /// Create the Azure container at start if it does not exist.
    pub create_container: bool,
    /// Master key file; default <data_dir>/master.key (created on first start).
    pub master_key_file: Option<PathBuf>,
    /// Block size for newly protected disks, bytes (power of two, 64 KiB - 64 MiB).
    pub block_size: u32,
    /// zstd level for chunks (1 is fast; higher trades CPU for space).
    pub zstd_level: i32,
    /// Threads for hashing, compression and sealing; 0 = one per core.
    pub cpu_threads: usize,
    /// Objects sealed with one key before the server rotates to a new key by itself (random
    /// 96-bit nonces are safe for about 2^32 per key); at most 2^31.
    pub key_rotate_after_seals: u64,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            url: None,
            options: BTreeMap::new(),
            create_container: false,
            master_key_file: None,
            block_size: DEFAULT_BLOCK_SIZE,
            zstd_level: 1,
            cpu_threads: 0,
            key_rotate_after_seals: crate::chunk::keys::DEFAULT_ROTATE_AFTER,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Block and patch uploads the server stores at once (hash, compress, seal, write), taken
    /// only once a body has arrived whole; further complete bodies wait in memory.
    pub max_inflight_blocks: usize,
    /// Memory for upload bodies being received, waiting or stored (blocks, patches, log
    /// frames), MiB; a body waits on its socket until its length is reserved.
    pub body_memory_mib: u64,
    /// The part of `body_memory_mib` one host may hold, MiB: at most half of it, so one host
    /// sending slowly never holds what the others need; at least `vault.block_size`.
    pub body_memory_per_host_mib: u64,
    /// Largest change log accepted, bytes (larger uploads get 413). Logs are stored in frames
    /// as they arrive, so this bounds vault space per log, not memory.
    pub max_log_bytes: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_inflight_blocks: 16,
            // One host may hold what every upload together could before (16 blocks of 4 MiB);
            // four hosts at full speed fill the budget.
            body_memory_mib: 256,
            body_memory_per_host_mib: 64,
            max_log_bytes: 64 << 30,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Config::parse(&text, &p)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        c.validate()?;
        // Networks and mappings are checked against the text so errors name the line.
        c.networks()
            .validate(text)
            .map_err(|e| ConfigError::Parse {
                path: origin.to_string(),
                message: e.to_string(),
            })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = self.vault.block_size;
        if !b.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&b) {
            return Err(ConfigError::Invalid(format!(
                "vault.block_size {b}: must be a power of two from 65536 to 67108864"
            )));
        }
        if !(1..=19).contains(&self.vault.zstd_level) {
            return Err(ConfigError::Invalid(format!(
                "vault.zstd_level {}: must be 1-19",
                self.vault.zstd_level
            )));
        }
        let r = self.vault.key_rotate_after_seals;
        if !(1..=crate::chunk::keys::MAX_ROTATE_AFTER).contains(&r) {
            return Err(ConfigError::Invalid(format!(
                "vault.key_rotate_after_seals {r}: must be 1 to {} (well before 2^32 seals per key)",
                crate::chunk::keys::MAX_ROTATE_AFTER
            )));
        }
        if self.ingest.max_inflight_blocks == 0 || self.server.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "ingest.max_inflight_blocks and server.max_connections must be at least 1".into(),
            ));
        }
        self.resync.window()?;
        crate::webhooks::validate(&self.webhooks)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.validate_connections()?;
        self.validate_body_memory()?;
        let s = &self.server;
        // NaN fails every comparison: "not finite and non-negative" catches it too.
        let usable = |x: f64| x.is_finite() && x >= 0.0;
        if !usable(s.host_rate_per_s)
            || !usable(s.host_rate_burst)
            || (s.host_rate_per_s > 0.0 && s.host_rate_burst < 1.0)
        {
            return Err(ConfigError::Invalid(format!(
                "server.host_rate_per_s {} / host_rate_burst {}: non-negative numbers, burst at least 1 when the rate is on",
                s.host_rate_per_s, s.host_rate_burst
            )));
        }
        if s.body_idle_timeout_s == 0 {
            return Err(ConfigError::Invalid(
                "server.body_idle_timeout_s must be at least 1".into(),
            ));
        }
        if !(2..=3600).contains(&self.cluster.lease_ttl_s) {
            return Err(ConfigError::Invalid(format!(
                "cluster.lease_ttl_s {}: 2 to 3600 seconds",
                self.cluster.lease_ttl_s
            )));
        }
        if let Some(id) = &self.cluster.server_id {
            if !crate::cluster::valid_server_id(id) {
                return Err(ConfigError::Invalid(format!(
                    "cluster.server_id {id:?}: 1 to 64 of A-Z a-z 0-9 . _ -"
                )));
            }
        }
        if !["text", "json"].contains(&self.server.log_format.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "server.log_format {:?}: \"text\" or \"json\"",
                self.server.log_format
            )));
        }
        Ok(())
    }

    fn validate_connections(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        // The accept loop counts slots in a u32 when it drains them at shutdown.
        const MAX: usize = 1_000_000;
        if s.max_connections > MAX || s.reserved_connections == 0 || s.reserved_connections > MAX {
            return Err(ConfigError::Invalid(format!(
                "server.max_connections {} / reserved_connections {}: 1 to {MAX} each (the reserve keeps /healthz and the operator reachable when every other slot is taken)",
                s.max_connections, s.reserved_connections
            )));
        }
        if let Some(n) = s.max_connections_per_address {
            if n == 0 || n > s.max_connections {
                return Err(ConfigError::Invalid(format!(
                    "server.max_connections_per_address {n}: 1 to max_connections ({})",
                    s.max_connections
                )));
            }
        }
        if s.idle_timeout_s == 0 {
            return Err(ConfigError::Invalid(
                "server.idle_timeout_s must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn validate_body_memory(&self) -> Result<(), ConfigError> {
        let i = &self.ingest;
        let block_mib = u64::from(self.vault.block_size).div_ceil(1 << 20);
        if i.body_memory_per_host_mib < block_mib
            || i.body_memory_per_host_mib.saturating_mul(2) > i.body_memory_mib
            || i.body_memory_mib > 1 << 20
        {
            return Err(ConfigError::Invalid(format!(
                "ingest.body_memory_per_host_mib {} / body_memory_mib {}: the share must hold one block (vault.block_size, {block_mib} MiB) and be at most half the budget (so one host never holds it all); the budget at most 1048576 MiB",
                i.body_memory_per_host_mib, i.body_memory_mib
            )));
        }
        Ok(())
    }

    pub fn vault_url(&self) -> Result<String, ConfigError> {
        match &self.vault.url {
            Some(u) => Ok(u.clone()),
            None => {
                let dir = absolute(&self.server.data_dir.join("vault"))?;
                Ok(format!("file://{}", dir.display()))
            }
        }
    }

    /// The failover networks and mappings.
    pub fn networks(&self) -> crate::failover::network::NetworkConfig {
        crate::failover::network::NetworkConfig::from_parts(
            self.network.clone(),
            self.mapping.clone(),
        )
    }

    /// The Azure storage failover target, when `[failover] target` names one.
    pub fn failover_target(
        &self,
    ) -> Result<Option<crate::failover::azure_target::AzureTarget>, crate::store::StoreError> {
        let Some(url) = &self.failover.target else {
            return Ok(None);
        };
        let options: Vec<(String, String)> = self
            .failover
            .target_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        crate::failover::azure_target::AzureTarget::open(url, &options).map(Some)
    }

    pub fn failover_dir(&self) -> PathBuf {
        self.failover
            .output_dir
            .clone()
            .unwrap_or_else(|| self.server.data_dir.join("failover"))
    }

    pub fn master_key_path(&self) -> PathBuf {
        self.vault
            .master_key_file
            .clone()
            .unwrap_or_else(|| self.server.data_dir.join("master.key"))
    }

    /// The per-request limits of the API.
    pub fn request_limits(&self) -> crate::api::limits::RequestLimits {
        let s = &self.server;
        crate::api::limits::RequestLimits {
            body_min_rate: s.body_min_rate_bytes_per_s,
            body_rate_grace: std::time::Duration::from_secs(s.body_rate_grace_s),
            body_idle_timeout: std::time::Duration::from_secs(s.body_idle_timeout_s),
            host_rate_per_s: s.host_rate_per_s,
            host_rate_burst: s.host_rate_burst,
        }
    }

    /// The connection limits of the accept loop.
    pub fn serve_limits(&self) -> crate::api::server::ServeLimits {
        let s = &self.server;
        crate::api::server::ServeLimits {
            max_connections: s.max_connections,
            max_connections_per_address: s
                .max_connections_per_address
                .unwrap_or(s.max_connections.div_ceil(4)),
            reserved_connections: s.reserved_connections,
            header_read_timeout: std::time::Duration::from_secs(s.header_read_timeout_s),
            idle_timeout: std::time::Duration::from_secs(s.idle_timeout_s),
            handshake_timeout: std::time::Duration::from_secs(s.tls_handshake_timeout_s),
            shutdown_grace: std::time::Duration::from_secs(s.shutdown_grace_s),
        }
    }

    pub fn cpu_threads(&self) -> usize {
        if self.vault.cpu_threads == 0 {
            crate::chunk::CpuPool::default_threads()
        } else {
            self.vault.cpu_threads
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf, ConfigError> {
    std::path::absolute(p).map_err(|e| ConfigError::Invalid(format!("path {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8443");
        assert_eq!(c.vault.block_size, 4 * 1024 * 1024);
        assert!(Config::parse("[vault]\nblock_size = 1000\n", "t").is_err());
        assert!(
            Config::parse("[vault]\nblok_size = 65536\n", "t").is_err(),
            "typos are errors"
        );
        assert!(Config::parse("[server]\nlog_format = \"xml\"\n", "t").is_err());
        assert!(Config::parse("[server]\nhost_rate_per_s = -1.0\n", "t").is_err());
        assert!(Config::parse("[vault]\nkey_rotate_after_seals = 0\n", "t").is_err());
        assert!(Config::parse("[vault]\nkey_rotate_after_seals = 4294967296\n", "t").is_err());
        assert!(Config::parse("[server]\nhost_rate_burst = 0.5\n", "t").is_err());
        assert!(Config::parse("[server]\nbody_idle_timeout_s = 0\n", "t").is_err());
        assert!(Config::parse("[server]\nidle_timeout_s = 0\n", "t").is_err());
        assert!(Config::parse("[server]\nreserved_connections = 0\n", "t").is_err());
        assert!(Config::parse(
            "[server]\nmax_connections = 8\nmax_connections_per_address = 9\n",
            "t"
        )
        .is_err());
        assert!(Config::parse("[server]\nmax_connections_per_address = 0\n", "t").is_err());
        assert_eq!(
            Config::parse("[server]\nmax_connections = 10\n", "t")
                .unwrap()
                .serve_limits()
                .max_connections_per_address,
            3,
            "a quarter, rounded up"
        );
        // One host's share: at most half the budget, at least one block.
        assert!(Config::parse("[ingest]\nbody_memory_per_host_mib = 129\n", "t").is_err());
        assert!(Config::parse("[ingest]\nbody_memory_per_host_mib = 2\n", "t").is_err());
        assert!(Config::parse(
            "[vault]\nblock_size = 1048576\n[ingest]\nbody_memory_per_host_mib = 2\nbody_memory_mib = 4\n",
            "t"
        )
        .is_ok());
        let off = Config::parse(
            "[server]\nhost_rate_per_s = 0.0\nhost_rate_burst = 0.0\n",
            "t",
        );
        assert!(off.is_ok(), "0 turns the rate limit off");
    }

    /// The example file states every setting with its default: each value it states must be
    /// the one the code uses when the setting is left out (the networks and mappings are
    /// examples, not defaults).
    #[test]
    fn the_example_config_states_the_defaults_of_the_code() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/drvault.example.toml");
        let example = Config::load(&path).unwrap();
        example.validate().unwrap();
        let d = Config::default();
        // Each section's name, as the example states it and as the code defaults it.
        macro_rules! sections {
            ($($name:ident),*) => {
                [$((stringify!($name), format!("{:?}", example.$name), format!("{:?}", d.$name))),*]
            };
        }
        let sections =
            sections!(server, vault, ingest, replica, failover, resync, verify, gc, health);
        for (name, stated, default) in sections {
            assert_eq!(
                stated,
                default,
                "[{name}] of {} differs from the code's defaults",
                path.display()
            );
        }
        // And it states them, rather than leaving them out: every section's keys are present.
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        for (section, keys) in [
            ("gc", &["grace_s", "interval_s"][..]),
            ("verify", &["interval_s"][..]),
            ("replica", &["merge_interval_s"][..]),
            ("health", &["not_reporting_critical_floor_s"][..]),
            ("failover", &["planned_wait_s"][..]),
            ("resync", &["window"][..]),
            ("ingest", &["max_inflight_blocks", "max_log_bytes"][..]),
        ] {
            for k in keys {
                assert!(
                    table[section].get(*k).is_some(),
                    "[{section}] {k} is not stated"
                );
            }
        }
    }

    #[test]
    fn network_mistakes_name_their_line() {
        let text = "[[network]]\nname = \"n\"\naddress_space = [\"10.0.0.0/16\"]\n  [[network.subnet]]\n  name = \"s\"\n  prefix = \"10.0.1.0/24\"\n  gateway = \"10.0.2.1\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("line 7"), "{e}");
        let text = "[[network]]\nname = \"n\"\naddress_space = [\"10.0.0.0/16\"]\n  [[network.subnet]]\n  name = \"s\"\n  prefix = \"10.0.1.0/24\"\n[[mapping]]\nsource = \"corp\"\ntarget = \"n/nope\"\n";
        let e = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(e.contains("line 9"), "{e}");
    }

    #[test]
    fn shipped_examples_parse() {
        for f in ["config/drvault.example.toml", "config/azure.example.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Config::load(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
