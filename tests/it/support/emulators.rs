//! Cloud-storage emulators for integration tests: Azurite (Azure Blob, from the repo's npm
//! devDependencies) and moto (S3, from PyPI), each started per test on a free loopback port and
//! killed when the handle drops.
//!
//! Include with `#[path = "support/emulators.rs"] mod emulators;`.
//!
//! A missing emulator fails the test with the install hint, so CI cannot silently pass without
//! testing a backend. Setting `DRVAULT_SKIP_AZURITE=1` / `DRVAULT_SKIP_MOTO=1` turns that into
//! a loud SKIPPED line (written past the test harness's output capture) and `None` instead;
//! an emulator that is installed still runs. `DRVAULT_AZURITE_BIN` / `DRVAULT_MOTO_BIN`
//! override the executables.
#![allow(dead_code)]

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Azurite's well-known development account and key (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running emulator process; killed (and reaped) on drop.
struct Emulator {
    name: &'static str,
    child: Child,
    port: u16,
    /// Holds the emulator's stdout/stderr, shown if it fails to start.
    log: tempfile::NamedTempFile,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // Errors here mean the process is already gone, which is what we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes straight to the process's stderr: libtest captures `eprintln!` of passing tests,
/// and a skipped backend must be visible in every run.
fn loud(msg: &str) {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "\n******** SKIPPED: {msg} ********\n");
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false)
}

/// A port that was free a moment ago. The emulator binds it right after; another process
/// taking it in between would show up as a start failure, not as a wrong result.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    l.local_addr()
        .expect("local address of a bound socket")
        .port()
}

fn spawn(
    name: &'static str,
    program: &PathBuf,
    args: &[String],
    port: u16,
) -> std::io::Result<Emulator> {
    let log = tempfile::NamedTempFile::new()?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.reopen()?)
        .stderr(log.reopen()?)
        .spawn()?;
    let mut emu = Emulator {
        name,
        child,
        port,
        log,
    };
    emu.wait_ready();
    Ok(emu)
}

impl Emulator {
    fn wait_ready(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited before listening ({status}); its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not accept connections on {addr} within {READY_TIMEOUT:?}; its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.log.path())
            .unwrap_or_else(|e| format!("(log unreadable: {e})"))
    }
}

/// Starts `program`, or handles its absence as the module docs say.
fn start(
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    skip_var: &str,
    hint: &str,
) -> Option<Emulator> {
    match spawn(name, &program, &args, port) {
        Ok(emu) => Some(emu),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if env_flag(skip_var) {
                loud(&format!(
                    "{name} not found at {} and {skip_var}=1: {hint}",
                    program.display()
                ));
                None
            } else {
                panic!(
                    "{name} not found at {}: {hint} (or set {skip_var}=1 to skip)",
                    program.display()
                )
            }
        }
        Err(e) => panic!("cannot start {name} ({}): {e}", program.display()),
    }
}

/// A private Azurite blob service.
pub struct Azurite {
    emu: Emulator,
}

impl Azurite {
    /// Starts `node_modules/.bin/azurite-blob` (in-memory, quiet) on a free port.
    pub fn start() -> Option<Azurite> {
        let program = std::env::var_os("DRVAULT_AZURITE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node_modules/.bin/azurite-blob")
            });
        let port = free_port();
        let p = port.to_string();
        let args = [
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &p,
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--silent",
        ]
        .map(String::from)
        .to_vec();
        start(
            "Azurite",
            program,
            args,
            port,
            "DRVAULT_SKIP_AZURITE",
            "run `npm ci` in the repo root (Azurite is a devDependency)",
        )
        .map(|emu| Azurite { emu })
    }

    /// The blob endpoint, account included (path-style, as the emulator expects).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.emu.port)
    }

    /// `Store::open` options for `az://{container}` on this emulator.
    pub fn store_options(&self, container: &str) -> Vec<(String, String)> {
        [
            ("azure_storage_account_name", AZURITE_ACCOUNT.to_string()),
            ("azure_storage_account_key", AZURITE_KEY.to_string()),
            ("azure_storage_endpoint", self.url()),
            ("azure_container_name", container.to_string()),
            ("azure_allow_http", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The `[vault]` part of a `drvault serve` config that keeps the vault in `az://{container}`
    /// on this emulator, with `create_container = true` so the server makes the container on its
    /// first start. `vault_extra` holds further `[vault]` keys (e.g. `"block_size = 262144\n"`);
    /// other sections go after the returned text (it ends inside `[vault.options]`, and TOML
    /// allows a table only once, so callers must not write a `[vault]` of their own).
    pub fn vault_config(&self, container: &str, vault_extra: &str) -> String {
        let mut s = format!(
            "[vault]\nurl = \"az://{container}\"\ncreate_container = true\n{vault_extra}\n[vault.options]\n"
        );
        for (k, v) in self.store_options(container) {
            // The container comes from the URL; the other keys are plain strings.
            if k != "azure_container_name" {
                s.push_str(&format!("{k} = \"{v}\"\n"));
            }
        }
        s.push('\n');
        s
    }

    /// An object_store client for `container` on this emulator (no drvault code in between).
    fn blob_store(&self, container: &str) -> object_store::azure::MicrosoftAzure {
        let mut b = object_store::azure::MicrosoftAzureBuilder::new();
        for (k, v) in self.store_options(container) {
            let key: object_store::azure::AzureConfigKey = k
                .parse()
                .unwrap_or_else(|e| panic!("azure option {k}: {e}"));
            b = b.with_config(key, v);
        }
        b.build()
            .unwrap_or_else(|e| panic!("azure store for {container}: {e}"))
    }

    /// Every blob in `container` with its size, sorted by name: the whole vault as the server
    /// left it, foreign or half-written objects included (listed with object_store directly,
    /// not through drvault's `Store`, which skips keys it does not recognise).
    pub async fn objects(&self, container: &str) -> Vec<(String, u64)> {
        use futures_util::TryStreamExt as _;
        use object_store::ObjectStore as _;
        let s = self.blob_store(container);
        let metas: Vec<object_store::ObjectMeta> = s
            .list(None)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("list container {container}: {e}"));
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| (m.location.to_string(), m.size))
            .collect();
        out.sort();
        out
    }

    /// The bytes of blob `name` in `container` (an error text if it cannot be read).
    pub async fn read(&self, container: &str, name: &str) -> Result<Vec<u8>, String> {
        use object_store::ObjectStoreExt as _;
        let s = self.blob_store(container);
        let path = object_store::path::Path::from(name);
        let got = s.get(&path).await.map_err(|e| format!("get {name}: {e}"))?;
        let bytes = got.bytes().await.map_err(|e| format!("read {name}: {e}"))?;
        Ok(bytes.to_vec())
    }

    /// Creates `name`; true when it did not exist yet.
    pub async fn create_container(&self, name: &str) -> bool {
        drvault::store::azure::ensure_container(&self.url(), AZURITE_ACCOUNT, AZURITE_KEY, name)
            .await
            .unwrap_or_else(|e| panic!("create container {name} on Azurite: {e}"))
    }
}

/// A private moto S3 server.
pub struct Moto {
    emu: Emulator,
}

impl Moto {
    /// Starts `moto_server` (from PATH unless `DRVAULT_MOTO_BIN` is set) on a free port.
    pub fn start() -> Option<Moto> {
        let program = std::env::var_os("DRVAULT_MOTO_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("moto_server"));
        let port = free_port();
        let p = port.to_string();
        let args = ["-H", "127.0.0.1", "-p", &p].map(String::from).to_vec();
        start(
            "moto_server",
            program,
            args,
            port,
            "DRVAULT_SKIP_MOTO",
            "run `pip install 'moto[server]==5.2.1'`",
        )
        .map(|emu| Moto { emu })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.emu.port)
    }

    /// `Store::open` options for `s3://{bucket}` on this server.
    pub fn store_options(&self, bucket: &str) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.url()),
            ("aws_allow_http", "true".to_string()),
            ("aws_virtual_hosted_style_request", "false".to_string()),
            ("aws_access_key_id", "testing".to_string()),
            ("aws_secret_access_key", "testing".to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_bucket", bucket.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Creates `bucket` (moto accepts an unsigned `PUT /bucket`).
    pub async fn create_bucket(&self, bucket: &str) {
        let url = format!("{}/{bucket}", self.url());
        let resp = reqwest::Client::new()
            .put(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
        assert!(resp.status().is_success(), "PUT {url}: {}", resp.status());
    }
}
