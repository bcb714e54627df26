//! Shared helpers for the integration tests: a real `drvault serve` child process on
//! 127.0.0.1:0 with its own data directory, the CLI, and image fixtures made with qemu-img.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use drvault::client::Client;
use drvault::server::ServerFile;

pub mod cluster;
mod wait;
pub use wait::{eventually, eventually_async};

pub const BIN: &str = env!("CARGO_BIN_EXE_drvault");
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
/// The parent id of a disk's first change log.
pub const ZERO_GUID: &str = "00000000-0000-0000-0000-000000000000";

/// A running server. Killed on drop.
pub struct Server {
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub url: String,
    pub ca_pem: String,
    pub token: String,
    child: Option<Child>,
    listen: String,
    config: Option<String>,
    env: Vec<(String, String)>,
}

impl Server {
    /// Waits until job `job` is in state `want` (as `drvault jobs <id> --json` shows it) and
    /// returns it; a job that fails while another state is awaited ends the wait at once.
    pub fn wait_job(&self, job: &str, want: &str) -> serde_json::Value {
        eventually(
            Duration::from_secs(60),
            &format!("job {job} reaches {want}"),
            || {
                let j: serde_json::Value =
                    serde_json::from_str(&self.cli_ok(&["jobs", job, "--json"]))
                        .map_err(|e| e.to_string())?;
                if j["state"] == want {
                    return Ok(j);
                }
                assert!(
                    j["state"] != "failed",
                    "job {job} failed while waiting for {want}: {j}"
                );
                Err(j.to_string())
            },
        )
    }

    /// Starts `drvault serve` in `dir/data` with an optional TOML config, on a free port.
    /// With an Azurite vault: `Server::start(dir, Some(&azurite.vault_config("vault", "")))`.
    pub fn start(dir: &Path, config: Option<&str>) -> Server {
        Server::start_with(dir, config, "127.0.0.1:0", &[])
    }

    /// Starts `drvault serve` listening on `listen`, with extra environment variables (e.g.
    /// `DRVAULT_FAULTS`). The same data directory and address can be started again after a
    /// kill ([`Server::restart`]), so agents holding the URL reconnect.
    pub fn start_with(
        dir: &Path,
        config: Option<&str>,
        listen: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let data_dir = dir.join("data");
        let mut s = Server {
            dir: dir.to_path_buf(),
            data_dir,
            url: String::new(),
            ca_pem: String::new(),
            token: String::new(),
            child: None,
            listen: listen.to_string(),
            config: config.map(String::from),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.spawn();
        s
    }

    /// Starts the server listening on `listen` (e.g. the address of an earlier run).
    pub fn start_at(dir: &Path, config: Option<&str>, listen: &str) -> Server {
        Server::start_with(dir, config, listen, &[])
    }

    fn spawn(&mut self) {
        let data_dir = self.data_dir.clone();
        let _ = std::fs::remove_file(data_dir.join("server.json"));
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(&self.listen);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(c) = &self.config {
            let p = self.dir.join("server.toml");
            std::fs::write(&p, c).unwrap();
            cmd.arg("--config").arg(p);
        }
        // Appended: a restarted server's log follows the previous one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn drvault serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(t) = std::fs::read_to_string(data_dir.join("server.json")) {
                if let Ok(sf) = serde_json::from_str::<ServerFile>(&t) {
                    self.url = sf.url;
                    self.ca_pem = std::fs::read_to_string(sf.ca_cert).unwrap();
                    self.token = std::fs::read_to_string(data_dir.join("operator.token"))
                        .unwrap()
                        .trim()
                        .to_string();
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("server exited early ({st}): {}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: no shutdown, no flush, nothing drained; waits until the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data directory, address and environment.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running server");
        self.spawn();
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn operator(&self) -> Client {
        Client::new(&self.url, &self.token, Some(&self.ca_pem)).unwrap()
    }

    pub fn client_with(&self, token: &str) -> Client {
        Client::new(&self.url, token, Some(&self.ca_pem)).unwrap()
    }

    /// Runs the CLI against this server (operator commands find it through --data-dir).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("DRVAULT_DATA_DIR", &self.data_dir)
            .env("DRVAULT_BACKOFF_SCALE", "0.001")
            .current_dir(&self.dir)
            .output()
            .expect("run drvault")
    }

    /// Runs the CLI and insists on success.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        succeeded(&self.cli(args), &format!("drvault {args:?}"))
    }

    /// `drvault export` of disk `os` of `vm` at `point` as a raw image into `out`.
    pub fn export_os_raw(&self, vm: &str, point: &str, out: &Path) -> Output {
        self.export(vm, "os", point, "raw", out)
    }

    /// Exports disk `os` of `vm` at `point` as raw into `scratch` and checks it equals
    /// `expected` byte for byte; the export is removed afterwards.
    pub fn export_os_equals(&self, vm: &str, point: &str, expected: &Path, scratch: &Path) {
        let out = scratch.join(format!("{vm}-{point}.raw"));
        succeeded(
            &self.export_os_raw(vm, point, &out),
            &format!("export of {vm} at {point}"),
        );
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(expected).unwrap(),
            "{vm} at {point} does not export as the disk was"
        );
        std::fs::remove_file(out).unwrap();
    }

    /// `drvault export` of `disk` of `vm` at `point` as `format` (raw or vhd) into `out`.
    pub fn export(&self, vm: &str, disk: &str, point: &str, format: &str, out: &Path) -> Output {
        self.cli(&[
            "export",
            "--vm",
            vm,
            "--disk",
            disk,
            "--point",
            point,
            "--format",
            format,
            "-o",
            out.to_str().unwrap(),
        ])
    }

    /// Registers a host and returns the path of its credentials file.
    pub fn add_host(&self, name: &str, cloud: Option<&str>) -> PathBuf {
        let out = self.dir.join(format!("{name}.creds.json"));
        let o = out.to_str().unwrap().to_string();
        let mut args = vec!["host", "add", name, "-o", &o];
        if let Some(c) = cloud {
            args.push("--cloud");
            args.push(c);
        }
        self.cli_ok(&args);
        out
    }

    /// `drvault agent protect --creds CREDS --vm VM --disk DISK EXTRA…` (DISK as the CLI takes
    /// it, e.g. `PATH:ID`), which must succeed; its output.
    pub fn protect(&self, creds: &Path, vm: &str, disk: &str, extra: &[&str]) -> String {
        let creds = creds.display().to_string();
        let mut args = vec![
            "agent", "protect", "--creds", &creds, "--vm", vm, "--disk", disk,
        ];
        args.extend_from_slice(extra);
        self.cli_ok(&args)
    }

    pub fn host_token(creds: &Path) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(creds).unwrap()).unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// Every object file in the local vault (path relative to the vault root).
    pub fn vault_objects(&self, prefix: &str) -> Vec<String> {
        let root = self.data_dir.join("vault");
        let mut out = Vec::new();
        walk(&root.join(prefix), &root, &mut out);
        out.sort();
        out
    }

    /// `host:port` the server listens on.
    pub fn addr(&self) -> String {
        self.url.trim_start_matches("https://").to_string()
    }

    /// SIGKILL, then wait: a crash, with no chance to finish requests or flush anything.
    /// `Server::start_at(&dir, config, &addr)` afterwards is the restart.
    pub fn kill(&mut self) {
        assert!(self.child.is_some(), "kill of a stopped server");
        self.kill9();
    }

    /// Stops the server cleanly (SIGTERM) and starts it again on the same data directory and
    /// address, so credentials files written before still reach it. `config` is written again:
    /// pass the same one (a vault on Azurite stays on the same container).
    pub fn restart_clean(mut self, config: Option<&str>) -> Server {
        let addr = self.addr();
        let st = self.stop();
        assert!(st.success(), "server stopped with {st}: {}", self.log());
        Server::start_at(&self.dir.clone(), config, &addr)
    }

    /// SIGTERM, then wait for exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("server did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, root, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

/// Insists that a command succeeded (its output in the message if not); returns its stdout.
pub fn succeeded(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1 (bound once and released; good enough for a test's server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a command, insisting on success; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable ({e}); .ci/run installs it"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// splitmix64: seeded test data and schedules (the crash harness draws its kills from it).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in [lo, hi) (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }

    /// A random version-4-shaped GUID.
    pub fn guid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }
}

/// Deterministic pseudo-random bytes (splitmix64).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// One replication cycle of a raw disk: `prev` copied to `next` with `writes` random
/// sector-aligned writes of up to `max_len` bytes (about a quarter of them zeros), and the MS-HRL
/// log from one to the other made by `drvault hrl diff` into `log`, chained to `prev_id` (the
/// zero GUID for the first). Returns the new log's id.
pub fn next_cycle(
    rng: &mut Rng,
    prev: &Path,
    next: &Path,
    log: &Path,
    prev_id: &str,
    writes: usize,
    max_len: u64,
) -> String {
    use std::os::unix::fs::FileExt;
    std::fs::copy(prev, next).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(next).unwrap();
    let sectors = f.metadata().unwrap().len() / 512;
    for _ in 0..writes {
        let off = rng.range(0, sectors - max_len / 512) * 512;
        let len = rng.range(8, max_len / 512) as usize * 512;
        let bytes = if rng.range(0, 4) == 0 {
            vec![0u8; len]
        } else {
            pseudo_random(len, rng.next())
        };
        f.write_all_at(&bytes, off).unwrap();
    }
    drop(f);
    let uid = rng.guid();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    run(
        BIN,
        &[
            "hrl",
            "diff",
            &path(prev),
            &path(next),
            "-o",
            &path(log),
            "--previous-id",
            prev_id,
            "--unique-id",
            &uid,
        ],
    );
    uid
}

/// A raw image of `size` bytes: random data in the given (offset, len) regions, zeros elsewhere.
pub fn raw_image(path: &Path, size: u64, regions: &[(u64, usize)], seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in regions.iter().enumerate() {
        f.write_all_at(&pseudo_random(*len, seed + i as u64), *off)
            .unwrap();
    }
}

/// `qemu-img info` virtual size for a format.
pub fn qemu_virtual_size(path: &Path, fmt: &str) -> u64 {
    let out = run(
        "qemu-img",
        &["info", "-f", fmt, "--output=json", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// `qemu-img compare` of two images: true when identical.
pub fn qemu_identical(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
    Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            fa,
            "-F",
            fb,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ])
        .status()
        .expect("qemu-img")
        .success()
}

/// A log of `writes` made by the library writer, with the given ids.
pub fn make_log(
    writes: &[(u64, Vec<u8>)],
    id: drvault::format::hrl::Guid,
    prev: drvault::format::hrl::Guid,
) -> Vec<u8> {
    let params = drvault::format::hrl::HrlWriterParams {
        unique_id: id,
        previous_unique_id: prev,
        timestamp: 800_000_000,
        ..Default::default()
    };
    let mut w = drvault::format::hrl::HrlWriter::in_memory(params).unwrap();
    for (off, data) in writes {
        w.add_write(*off, data).unwrap();
    }
    w.finish_to_vec().unwrap()
}

/// Sends a log as a host agent would (`cycle`: the point number the agent asks for).
pub async fn send_log(
    c: &Client,
    vm: &str,
    disk: &str,
    log: &[u8],
    id: drvault::format::hrl::Guid,
    cycle: Option<u64>,
) -> Result<serde_json::Value, drvault::client::ClientError> {
    let q = cycle.map(|c| format!("?cycle={c}")).unwrap_or_default();
    c.send_stream(
        reqwest::Method::PUT,
        &format!("/v1/agent/vms/{vm}/disks/{disk}/logs/{id}{q}"),
        reqwest::Body::from(log.to_vec()),
        Some(log.len() as u64),
    )
    .await
}

/// Deterministic random writes: sector-aligned, overlapping, some across block boundaries,
/// some all-zero.
pub fn random_writes(seed: u64, disk: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    let r = pseudo_random(n * 16, seed);
    (0..n)
        .map(|i| {
            let a = u64::from_le_bytes(r[i * 16..i * 16 + 8].try_into().unwrap());
            let b = u64::from_le_bytes(r[i * 16 + 8..i * 16 + 16].try_into().unwrap());
            let len = 512 * (1 + b % 64);
            let off = (a % ((disk - len) / 512)) * 512;
            let data = if b % 7 == 0 {
                vec![0u8; len as usize]
            } else {
                pseudo_random(len as usize, a ^ b)
            };
            (off, data)
        })
        .collect()
}

/// The status, code and recoverable flag of an API refusal (panics on success).
pub fn refused(
    r: Result<serde_json::Value, drvault::client::ClientError>,
) -> (reqwest::StatusCode, String, bool) {
    match r {
        Err(drvault::client::ClientError::Api { status, body, .. }) => {
            (status, body.code, body.recoverable)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The fault rules of a server started with [`FaultRules::start`]: its store reads them from a
/// file (`DRVAULT_FAULTS=@file`) and reloads it whenever it changes.
pub struct FaultRules {
    path: PathBuf,
    changes: usize,
}

impl FaultRules {
    /// Starts a server in `dir` with no fault rules yet.
    pub fn start(dir: &Path, config: Option<&str>) -> (Server, FaultRules) {
        let path = dir.join("faults.spec");
        std::fs::write(&path, "# no faults yet\n").unwrap();
        let env = format!("@{}", path.display());
        let server = Server::start_with(
            dir,
            config,
            "127.0.0.1:0",
            &[("DRVAULT_FAULTS", env.as_str())],
        );
        (server, FaultRules { path, changes: 0 })
    }

    /// Replaces the rules and waits until `server` has taken them. The file is replaced by a
    /// rename, never rewritten in place (the server could read it empty and take no rules),
    /// and each change carries a version the server logs when it takes it, so the wait ends
    /// on this change's acknowledgement, not on an earlier one's.
    pub fn set(&mut self, server: &Server, rules: &str) {
        self.changes += 1;
        let version = self.changes;
        let tmp = self.path.with_extension("spec.tmp");
        std::fs::write(&tmp, format!("version={version}\n{rules}\n")).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
        eventually(
            Duration::from_secs(20),
            "the server takes the fault rules",
            || {
                let log = server.log();
                let taken = log
                    .lines()
                    .filter(|l| l.contains("fault rules replaced"))
                    .any(|l| logged_version(l) == Some(version));
                taken
                    .then_some(())
                    .ok_or_else(|| format!("rules {rules:?} (version {version}) not in: {log}"))
            },
        );
    }
}

/// The `version=N` field of a "fault rules replaced" log line.
fn logged_version(line: &str) -> Option<usize> {
    let rest = &line[line.find("version=")? + "version=".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Writes `data` at `offset` into an image file (in place).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, offset)
        .unwrap();
}
