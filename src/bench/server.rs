//! The server a benchmark talks to: one this harness spawns (`drvault serve --listen
//! 127.0.0.1:0 --data-dir DIR`, URL and operator token read from the files it writes, stopped
//! with SIGTERM), or an existing one named by host credentials (and, for the operator routes
//! that `bench deltas` and `bench failover` use, an operator token).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;

use super::{io_err, BenchError};
use crate::agent::backoff::Backoff;
use crate::agent::protect::{protect, DiskSource, ProtectOptions, ProtectSummary};
use crate::client::Client;
use crate::format::image::DiskImage;
use crate::server::{ServerFile, OPERATOR_TOKEN_FILE, SERVER_FILE};
use crate::wire::Credentials;

/// A server process this harness started.
pub struct SpawnedServer {
    child: tokio::process::Child,
    pub pid: u32,
    pub url: String,
    pub token: String,
    pub ca_pem: String,
}

impl SpawnedServer {
    /// Starts `exe serve` on a fresh `data_dir`, with `config` (TOML) when given, logging to
    /// `log`; returns once the server has written its `server.json`.
    pub async fn start(
        exe: &Path,
        data_dir: &Path,
        log: &Path,
        config: Option<&Path>,
    ) -> Result<SpawnedServer, BenchError> {
        let out = std::fs::File::create(log).map_err(io_err("creating", log))?;
        let err = out.try_clone().map_err(io_err("opening", log))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            // On any error path the server must not outlive the harness.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BenchError::Server(format!("cannot start {}: {e}", exe.display())))?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Server("server exited at once".into()))?;
        let mut s = SpawnedServer {
            child,
            pid,
            url: String::new(),
            token: String::new(),
            ca_pem: String::new(),
        };
        let sf_path = data_dir.join(SERVER_FILE);
        let deadline = Instant::now() + Duration::from_secs(60);
        let sf: ServerFile = loop {
            if let Ok(text) = std::fs::read_to_string(&sf_path) {
                if let Ok(sf) = serde_json::from_str::<ServerFile>(&text) {
                    break sf;
                }
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(BenchError::Server(format!(
                    "exited during startup ({status}); log {}:\n{}",
                    log.display(),
                    log_tail(log)
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Server(format!(
                    "no {} after 60 s; log {}:\n{}",
                    sf_path.display(),
                    log.display(),
                    log_tail(log)
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let tp = data_dir.join(OPERATOR_TOKEN_FILE);
        s.token = std::fs::read_to_string(&tp)
            .map_err(io_err("reading", &tp))?
            .trim()
            .to_string();
        s.ca_pem = std::fs::read_to_string(&sf.ca_cert).map_err(io_err("reading", &sf.ca_cert))?;
        s.url = sf.url;
        Ok(s)
    }

    /// Starts a server with its data and log under `run_dir` and registers the host "bench".
    pub async fn with_host(
        exe: &Path,
        run_dir: &Path,
    ) -> Result<(SpawnedServer, Credentials), BenchError> {
        SpawnedServer::with_host_config(exe, run_dir, None).await
    }

    /// [`SpawnedServer::with_host`] with a config (TOML text, written to `run_dir/server.toml`).
    pub async fn with_host_config(
        exe: &Path,
        run_dir: &Path,
        config: Option<&str>,
    ) -> Result<(SpawnedServer, Credentials), BenchError> {
        let config_path = run_dir.join("server.toml");
        if let Some(text) = config {
            std::fs::write(&config_path, text).map_err(io_err("writing", &config_path))?;
        }
        let s = SpawnedServer::start(
            exe,
            &run_dir.join("data"),
            &run_dir.join("server.log"),
            config.map(|_| config_path.as_path()),
        )
        .await?;
        let creds = s.add_host("bench").await?;
        Ok((s, creds))
    }

    /// A client with the operator token.
    pub fn operator(&self) -> Result<Client, BenchError> {
        Ok(Client::new(&self.url, &self.token, Some(&self.ca_pem))?)
    }

    /// Registers a host and returns its credentials.
    pub async fn add_host(&self, name: &str) -> Result<Credentials, BenchError> {
        Ok(self
            .operator()?
            .send_json(
                Method::POST,
                "/v1/hosts",
                &serde_json::json!({ "name": name }),
            )
            .await?)
    }

    /// SIGKILL (a crash: nothing drained or flushed); waits until the process is gone.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM (graceful shutdown), then SIGKILL after 15 s.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(_) => Ok(()),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(BenchError::Server(format!(
                    "pid {} ignored SIGTERM for 15 s; killed",
                    self.pid
                )))
            }
        }
    }
}

/// The last 20 lines of a server log, for startup errors.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Host credentials of an existing server, with the URL overridden when `server` is given.
pub fn load_creds(path: &Path, server: Option<&str>) -> Result<Credentials, BenchError> {
    let mut creds = crate::agent::load_creds(path).map_err(|e| BenchError::Agent {
        vm: "-".into(),
        source: Box::new(e),
    })?;
    if let Some(s) = server {
        creds.server = s.to_string();
    }
    Ok(creds)
}

/// How `bench deltas` and `bench failover` reach a server.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TargetArgs {
    /// Target an existing server with these host credentials instead of spawning one per run
    /// (needs --token too).
    #[arg(long)]
    pub creds: Option<PathBuf>,
    /// With --creds: override the server URL written in the credentials.
    #[arg(long, requires = "creds")]
    pub server: Option<String>,
    /// With --creds: the operator token (points, merge, export and failover are operator
    /// routes).
    #[arg(long, env = "DRVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A server per run, or an existing one.
pub enum Target {
    Spawn {
        exe: PathBuf,
    },
    Remote {
        creds: Credentials,
        operator_token: String,
    },
}

impl Target {
    pub fn from_args(a: &TargetArgs) -> Result<Target, BenchError> {
        match (&a.creds, &a.token) {
            (Some(f), Some(t)) => Ok(Target::Remote {
                creds: load_creds(f, a.server.as_deref())?,
                operator_token: t.clone(),
            }),
            (Some(_), None) => Err(BenchError::Invalid(
                "--creds needs --token (or DRVAULT_TOKEN): the operator token of that server"
                    .into(),
            )),
            (None, _) => Ok(Target::Spawn {
                exe: std::env::current_exe()
                    .map_err(io_err("locating", Path::new("this binary")))?,
            }),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Spawn { .. } => "spawned per run (127.0.0.1, fresh data dir)".into(),
            Target::Remote { creds, .. } => creds.server.clone(),
        }
    }

    /// Starts a server under `run_dir` (or connects to the existing one).
    pub async fn session(&self, run_dir: &Path) -> Result<RunClients, BenchError> {
        self.session_with(run_dir, None).await
    }

    /// [`Target::session`] whose spawned server runs with `config` (TOML text); an existing
    /// server keeps its own, so a config is refused for one.
    pub async fn session_with(
        &self,
        run_dir: &Path,
        config: Option<&str>,
    ) -> Result<RunClients, BenchError> {
        match self {
            Target::Spawn { exe } => {
                let (s, creds) = SpawnedServer::with_host_config(exe, run_dir, config).await?;
                Ok(RunClients {
                    agent: agent_client(&creds)?,
                    operator: s.operator()?,
                    server: Some(s),
                })
            }
            Target::Remote { .. } if config.is_some() => Err(BenchError::Invalid(
                "this figure configures the server it measures (failover target, networks): run it without --creds".into(),
            )),
            Target::Remote {
                creds,
                operator_token,
            } => Ok(RunClients {
                agent: agent_client(creds)?,
                operator: Client::new(&creds.server, operator_token, Some(&creds.ca_cert_pem))?,
                server: None,
            }),
        }
    }
}

fn agent_client(creds: &Credentials) -> Result<Client, BenchError> {
    crate::agent::client_for(creds, None).map_err(|e| BenchError::Agent {
        vm: "-".into(),
        source: Box::new(e),
    })
}

/// One run's connections: the host agent's and the operator's.
pub struct RunClients {
    pub server: Option<SpawnedServer>,
    pub agent: Client,
    pub operator: Client,
}

impl RunClients {
    /// Protects `image` as the one disk `disk0` of a new generation-2 VM without NICs.
    pub async fn protect(
        &self,
        vm: &str,
        path: &Path,
        image: Arc<dyn DiskImage>,
    ) -> Result<ProtectSummary, BenchError> {
        self.protect_vm(vm, path, image, 2, Vec::new()).await
    }

    /// Protects `image` as the one disk `disk0` of a new VM of `generation` with `nics`.
    pub async fn protect_vm(
        &self,
        vm: &str,
        path: &Path,
        image: Arc<dyn DiskImage>,
        generation: u8,
        nics: Vec<crate::wire::NicSpec>,
    ) -> Result<ProtectSummary, BenchError> {
        let source = DiskSource {
            id: DISK.into(),
            path: path.to_path_buf(),
            image,
        };
        let opts = ProtectOptions {
            vm: vm.to_string(),
            generation,
            // A generation-1 guest here is the small boot fixture (256 MiB is plenty).
            cpus: if generation == 1 { 1 } else { 2 },
            memory_mib: if generation == 1 { 256 } else { 2048 },
            nics,
            policy: None,
            parallel: 4,
            backoff: quick_backoff(),
            progress: false,
            upload_latencies: None,
            throttle: None,
        };
        protect(&self.agent, std::slice::from_ref(&source), &opts)
            .await
            .map_err(|e| BenchError::Agent {
                vm: vm.to_string(),
                source: Box::new(e),
            })
    }

    /// Polls a job every `poll` until it succeeds (its JSON) or fails (an error).
    pub async fn wait_job(
        &self,
        id: &str,
        poll: Duration,
    ) -> Result<serde_json::Value, BenchError> {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let j: serde_json::Value = self.operator.get_json(&format!("/v1/jobs/{id}")).await?;
            match j["state"].as_str() {
                Some("succeeded") => return Ok(j),
                Some("failed") => {
                    return Err(BenchError::Server(format!(
                        "job {id} ({}) failed: {}",
                        j["title"], j["error"]
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(BenchError::Server(format!(
                        "job {id} still running after 1 h"
                    )))
                }
                _ => tokio::time::sleep(poll).await,
            }
        }
    }

    /// Stops a spawned server.
    pub async fn finish(self) -> Result<(), BenchError> {
        match self.server {
            Some(s) => s.stop().await,
            None => Ok(()),
        }
    }
}

/// The sum over every series of the counter `name` on the server's `/metrics` (open to any
/// client), or `None` when the server does not export it (an older server, or a counter not
/// yet touched).
pub async fn server_counter(client: &Client, name: &str) -> Result<Option<f64>, BenchError> {
    let (body, _) = client.get_bytes("/metrics").await?;
    Ok(counter_sum(&String::from_utf8_lossy(&body), name))
}

/// [`server_counter`] over a Prometheus text exposition.
pub fn counter_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name value` or `name{labels} value`; `name_more …` is another metric.
        let value = if let Some(v) = rest.strip_prefix(' ') {
            v
        } else if rest.starts_with('{') {
            match rest.rsplit_once("} ") {
                Some((_, v)) => v,
                None => continue,
            }
        } else {
            continue;
        };
        if let Ok(v) = value.trim().parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The server's count of object bytes it wrote into the vault (every store `put`).
pub const VAULT_WRITTEN: &str = "drvault_store_bytes_written_total";

/// What the vault bytes per changed byte figures compare with: a change written where it lands.
pub const IN_PLACE: &str =
    "1: the changed bytes written in place (hrl apply, ASR's replica page blob)";

/// Vault bytes written between two readings of [`VAULT_WRITTEN`] per changed byte (`None` when
/// the server keeps no such count or nothing changed).
pub fn per_changed_byte(before: Option<f64>, after: Option<f64>, changed: u64) -> Option<f64> {
    let written = after? - before.unwrap_or(0.0);
    (changed > 0).then(|| written.max(0.0) / changed as f64)
}

/// The disk id benchmarks give the image.
pub const DISK: &str = "disk0";

/// Retries should not happen on a local run; if they do, short waits keep the run going.
pub fn quick_backoff() -> Backoff {
    Backoff {
        scale: 0.01,
        give_up_after: Duration::from_secs(120),
    }
}

/// A random tag for VM names: an existing server keeps the VMs of earlier runs.
pub fn run_tag() -> String {
    let mut tag = [0u8; 4];
    crate::util::fill_random(&mut tag);
    hex::encode(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_summed_over_their_series_and_absent_ones_are_none() {
        let text = "# TYPE drvault_store_requests_total counter\n\
            drvault_store_requests_total{op=\"get\"} 3\n\
            drvault_store_requests_total{op=\"list\"} 4\n\
            drvault_store_requests_total_other 100\n\
            drvault_store_bytes_written_total 1048576\n";
        assert_eq!(counter_sum(text, "drvault_store_requests_total"), Some(7.0));
        assert_eq!(
            counter_sum(text, "drvault_store_bytes_written_total"),
            Some(1048576.0)
        );
        assert_eq!(counter_sum(text, "drvault_wire_bytes_received_total"), None);
    }

    #[test]
    fn vault_bytes_per_changed_byte() {
        assert_eq!(per_changed_byte(Some(100.0), Some(900.0), 400), Some(2.0));
        // The counter appears with the first write.
        assert_eq!(per_changed_byte(None, Some(400.0), 400), Some(1.0));
        assert_eq!(per_changed_byte(None, None, 400), None);
        assert_eq!(per_changed_byte(Some(1.0), Some(2.0), 0), None);
    }
}
