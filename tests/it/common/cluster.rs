//! N `drvault serve` processes on ONE vault (issue 19): each with its own data directory (its
//! own lock, server.json, operator token) and loopback port, all with the same vault URL, the
//! same master key file and the same TLS certificate and key, as servers behind one DNS name
//! are deployed. The vault is a local directory (file://), an Azurite container or a moto S3
//! bucket. Helpers register hosts on one server and hand an agent credentials that reach any
//! other, crash (SIGKILL), pause (SIGSTOP) and resume (SIGCONT) a server, and read its
//! /metrics.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Server, MIB};
use crate::emulators::{Azurite, Moto};

/// Where the shared vault lives. The emulator handles keep their process alive (killed on drop).
pub enum Backend {
    File,
    Azurite(Azurite),
    Moto(Moto),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::Azurite(_) => "azurite",
            Backend::Moto(_) => "moto-s3",
        }
    }
}

/// Servers sharing one vault. Servers are numbered from 0 in start order; a killed server
/// keeps its slot (restart it with [`Cluster::restart`]).
pub struct Cluster {
    pub dir: PathBuf,
    pub servers: Vec<Server>,
    /// The `drvault serve` config every server runs with (the same text for all).
    pub config: String,
    /// Declared after `servers`: fields drop in order, so the servers stop before the emulator.
    pub backend: Backend,
}

/// The container (Azurite) or bucket (moto) the vault is kept in.
const VAULT_BUCKET: &str = "vault";

impl Cluster {
    /// A cluster (no server started yet) on a local-directory vault under `dir`.
    pub fn file(dir: &Path) -> Cluster {
        let vault = dir.join("vault");
        std::fs::create_dir_all(&vault).unwrap();
        let vault_section = format!(
            "[vault]\nurl = \"file://{}\"\n{}",
            vault.display(),
            Self::shared_vault_keys(dir)
        );
        Cluster::with(dir, Backend::File, vault_section)
    }

    /// A cluster on a fresh Azurite container; `None` when Azurite is missing and
    /// `DRVAULT_SKIP_AZURITE=1` (see the emulators module).
    pub fn azurite(dir: &Path) -> Option<Cluster> {
        let az = Azurite::start()?;
        // Every server's start makes the container if it is missing (idempotent).
        let vault_section = az.vault_config(VAULT_BUCKET, &Self::shared_vault_keys(dir));
        Some(Cluster::with(dir, Backend::Azurite(az), vault_section))
    }

    /// A cluster on a fresh moto S3 bucket; `None` when moto is missing and
    /// `DRVAULT_SKIP_MOTO=1`. Create-only puts (the versioned records) go through S3's
    /// conditional `If-None-Match: *`, object_store's default for S3, which moto implements.
    pub fn moto(dir: &Path) -> Option<Cluster> {
        let moto = Moto::start()?;
        let url = format!("{}/{VAULT_BUCKET}", moto.url());
        let resp = block_on(async move { reqwest::Client::new().put(&url).send().await })
            .expect("create the moto bucket");
        assert!(
            resp.status().is_success(),
            "create bucket: {}",
            resp.status()
        );
        let mut vault_section = format!(
            "[vault]\nurl = \"s3://{VAULT_BUCKET}\"\n{}\n[vault.options]\n",
            Self::shared_vault_keys(dir)
        );
        for (k, v) in moto.store_options(VAULT_BUCKET) {
            // The bucket comes from the URL.
            if k != "aws_bucket" {
                vault_section.push_str(&format!("{k} = \"{v}\"\n"));
            }
        }
        Some(Cluster::with(dir, Backend::Moto(moto), vault_section))
    }

    /// The `[vault]` keys every server shares besides the URL: one master key, made here once
    /// (a server creates a missing key only in its own data directory).
    fn shared_vault_keys(dir: &Path) -> String {
        let key = dir.join("shared").join("master.key");
        if !key.exists() {
            std::fs::create_dir_all(key.parent().unwrap()).unwrap();
            set_private(key.parent().unwrap());
            drvault::chunk::keys::KeyRing::create_file(&key).unwrap();
        }
        format!("master_key_file = \"{}\"\n", key.display())
    }

    fn with(dir: &Path, backend: Backend, vault_section: String) -> Cluster {
        // One certificate for every server (self-signed for 127.0.0.1, so each loopback
        // address passes the check), as one DNS name in front of all of them would have.
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        set_private(&shared);
        let (cert, key) = (shared.join("cert.pem"), shared.join("key.pem"));
        if !cert.exists() {
            drvault::api::tls::generate_self_signed(&cert, &key).unwrap();
        }
        // [server] first: the Azurite text ends inside [vault.options].
        let config = format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\n{vault_section}\n",
            cert.display(),
            key.display()
        );
        Cluster {
            dir: dir.to_path_buf(),
            servers: Vec::new(),
            config,
            backend,
        }
    }

    /// Starts one more server on the vault (own data directory `dir/s<i>`, a free loopback
    /// port); returns its index.
    pub fn start_server(&mut self) -> usize {
        self.start_server_with(&[])
    }

    /// [`Cluster::start_server`] with extra environment variables for the process.
    pub fn start_server_with(&mut self, env: &[(&str, &str)]) -> usize {
        let i = self.servers.len();
        let dir = self.dir.join(format!("s{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        self.servers.push(Server::start_with(
            &dir,
            Some(&self.config),
            "127.0.0.1:0",
            env,
        ));
        i
    }

    /// Starts servers until there are `n`.
    pub fn start(&mut self, n: usize) {
        while self.servers.len() < n {
            self.start_server();
        }
    }

    pub fn server(&self, i: usize) -> &Server {
        &self.servers[i]
    }

    /// Registers host `name` on server `on`; the credentials file it wrote (URL of `on`).
    pub fn add_host(&self, on: usize, name: &str) -> PathBuf {
        self.servers[on].add_host(name, None)
    }

    /// A copy of the credentials file `creds` whose server URL is server `to`'s: how an agent
    /// is sent to one server of the cluster (the token and CA certificate are the same for
    /// every server). Written beside `creds` as `<stem>.s<to>.json`.
    pub fn creds_for(&self, creds: &Path, to: usize) -> PathBuf {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(creds).unwrap()).unwrap();
        v["server"] = serde_json::Value::String(self.servers[to].url.clone());
        let stem = creds.file_stem().unwrap().to_string_lossy().into_owned();
        let out = creds.with_file_name(format!("{stem}.s{to}.json"));
        std::fs::write(&out, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        out
    }

    /// SIGKILL of server `i`: a crash; waits until the process is gone.
    pub fn kill(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Starts server `i` again on its data directory and address.
    pub fn restart(&mut self, i: usize) {
        self.servers[i].restart();
    }

    /// SIGSTOP of server `i`: it keeps its sockets and state but runs nothing (a GC pause, a
    /// frozen VM) until [`Cluster::resume`].
    pub fn pause(&self, i: usize) {
        self.signal(i, "STOP");
    }

    /// SIGCONT of a paused server.
    pub fn resume(&self, i: usize) {
        self.signal(i, "CONT");
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.servers[i]
            .pid()
            .unwrap_or_else(|| panic!("server {i} is not running"));
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {pid} failed");
    }

    /// Server `i`'s Prometheus text from `GET /metrics`.
    pub fn metrics(&self, i: usize) -> String {
        let c = self.servers[i].operator();
        let (body, _) = block_on(async move { c.get_bytes("/metrics").await })
            .unwrap_or_else(|e| panic!("GET /metrics of server {i}: {e}"));
        String::from_utf8_lossy(&body).into_owned()
    }

    /// The sum over every series of metric `name` on server `i` (`None`: not exported).
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        drvault::bench::server::counter_sum(&self.metrics(i), name)
    }
}

/// A raw disk image of `mib` MiB for the cluster tests: random data in a few regions.
pub fn small_disk(path: &Path, mib: u64, seed: u64) {
    super::raw_image(
        path,
        mib * MIB,
        &[
            (0, 256 * 1024),
            (mib * MIB / 2, 512 * 1024),
            (mib * MIB - MIB, 64 * 1024),
        ],
        seed,
    );
}

/// Runs a future to completion on a runtime of its own, in a thread of its own, so it works
/// from plain tests and from inside a tokio test alike.
pub fn block_on<F>(f: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .expect("future panicked")
}

/// The servers refuse secret files readable by others; a directory of them stays private too.
fn set_private(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
}
