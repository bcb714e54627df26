//! A real server over a store that fails on purpose (`DRVAULT_FAULTS=@file`, re-read while it
//! runs, so each test breaks the store and heals it again without a restart):
//!
//! * transient errors and latency on every operation: the agents back off and finish, and no
//!   block or log is applied twice;
//! * a store that fails every call: recoverable error codes with Retry-After, `/healthz` says
//!   so, the server stays up, and everything works again once the store does;
//! * a full disk (the wrapper's `nospace`, an ENOSPC as the local backend reports it):
//!   `store_full`, nothing committed — no recovery point, no journal entry, no completed disk
//!   — and the same requests succeed once space returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use drvault::client::{Client, ClientError};
use reqwest::Method;
use serde_json::Value;

const MIB: u64 = 1024 * 1024;
const DISK: u64 = 8 * MIB;
const CONFIG: &str = "[vault]\nblock_size = 1048576\n\n[replica]\nmerge_interval_s = 0\n";
const ZERO_GUID: &str = "00000000-0000-0000-0000-000000000000";

struct Faulty {
    _t: tempfile::TempDir,
    dir: PathBuf,
    server: Server,
    spec: PathBuf,
    creds: PathBuf,
    host: Client,
    rng: Rng,
    changes: usize,
}

impl Faulty {
    /// A server whose store takes its faults from a file, empty at the start.
    fn start(seed: u64) -> Faulty {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let spec = dir.join("faults.spec");
        std::fs::write(&spec, "# no faults yet\n").unwrap();
        let env = format!("@{}", spec.display());
        let server = Server::start_with(
            &dir,
            Some(CONFIG),
            "127.0.0.1:0",
            &[("DRVAULT_FAULTS", env.as_str())],
        );
        let creds = server.add_host("hv", None);
        let host = server.client_with(&Server::host_token(&creds));
        Faulty {
            _t: t,
            dir,
            server,
            spec,
            creds,
            host,
            rng: Rng(seed),
            changes: 0,
        }
    }

    /// A server with VM `vm1` protected from a fresh image (returned first) and, ready to
    /// send, the log of one cycle (the disk's next state, then the log).
    fn protected(seed: u64) -> (Faulty, PathBuf, PathBuf, PathBuf) {
        let mut f = Faulty::start(seed);
        let s0 = f.image("s0.raw");
        let disk = format!("{}:os", s0.display());
        succeeded(
            &f.agent(&["protect", "--vm", "vm1", "--disk", &disk]),
            "protect",
        );
        let s1 = f.dir.join("s1.raw");
        let log = f.dir.join("c1.hrl");
        next_cycle(&mut Rng(seed), &s0, &s1, &log, ZERO_GUID, 3, MIB);
        (f, s0, s1, log)
    }

    /// Replaces the fault rules and waits until the server has taken them.
    fn faults(&mut self, rules: &str) {
        self.changes += 1;
        // The server reloads on change only: a numbered comment makes every write a change.
        std::fs::write(&self.spec, format!("# change {}\n{rules}\n", self.changes)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.server.log().matches("fault rules replaced").count() < self.changes {
            assert!(
                Instant::now() < deadline,
                "the server did not take the fault rules {rules:?}: {}",
                self.server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn agent(&self, args: &[&str]) -> Output {
        let mut full = vec![args[0], "--creds", self.creds.to_str().unwrap()];
        full.extend_from_slice(&args[1..]);
        let mut all = vec!["agent"];
        all.extend(full);
        self.server.cli(&all)
    }

    /// The operator's view of a VM (retried: the store may be failing on purpose).
    fn vm(&self, vm: &str) -> Value {
        let op = self.server.operator();
        let rt = self.rt();
        for _ in 0..50 {
            match rt.block_on(op.get_json(&format!("/v1/vms/{vm}"))) {
                Ok(v) => return v,
                Err(e) if e.recoverable() => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("view of {vm}: {e}"),
            }
        }
        panic!("view of {vm}: the store never answered")
    }

    fn points(&self, vm: &str) -> Vec<u64> {
        let ps: Value = self
            .rt()
            .block_on(
                self.server
                    .operator()
                    .get_json(&format!("/v1/vms/{vm}/points")),
            )
            .unwrap();
        ps.as_array()
            .unwrap()
            .iter()
            .map(|p| p["cycle"].as_u64().unwrap())
            .collect()
    }

    /// Faults of `kind` the server injected so far (its `drvault_faults_injected_total`).
    fn injected(&self, kind: &str) -> u64 {
        let text = self
            .rt()
            .block_on(async { self.anonymous_get("/metrics").await?.text().await })
            .unwrap();
        let prefix = format!("drvault_faults_injected_total{{kind=\"{kind}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Prints the faults the server injected in this test, by kind (figures for the README).
    fn report(&self, test: &str) {
        let kinds = ["error", "latency", "torn", "lost-after-ack", "nospace"];
        let counts: Vec<String> = kinds
            .iter()
            .map(|k| format!("{k}={}", self.injected(k)))
            .collect();
        eprintln!("faults injected in {test}: {}", counts.join(" "));
    }

    /// Status of `/healthz` (no token needed).
    fn healthz(&self) -> u16 {
        let r = self.rt().block_on(self.anonymous_get("/healthz"));
        r.unwrap().status().as_u16()
    }

    async fn anonymous_get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        let ca = reqwest::Certificate::from_pem(self.server.ca_pem.as_bytes())?;
        let c = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()?;
        c.get(format!("{}{path}", self.server.url)).send().await
    }

    fn rt(&self) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A raw disk with data in a few places.
    fn image(&mut self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let regions: Vec<(u64, usize)> = (0..4)
            .map(|_| (self.rng.range(0, DISK / MIB - 1) * MIB + 4096, 300_000))
            .collect();
        raw_image(&p, DISK, &regions, self.rng.next());
        p
    }

    fn export_equals(&self, vm: &str, point: &str, expected: &Path) {
        let out = self.dir.join(format!("{vm}-{point}.raw"));
        succeeded(
            &self.server.export_os_raw(vm, point, &out),
            &format!("export of {vm} at {point}"),
        );
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(expected).unwrap(),
            "{vm} at {point} does not export as the source was"
        );
    }
}

fn replicate(f: &Faulty, vm: &str, log: &Path, cycle: u64, give_up: &str) -> Output {
    f.agent(&[
        "replicate",
        "--vm",
        vm,
        "--disk",
        "os",
        "--hrl",
        log.to_str().unwrap(),
        "--cycle",
        &cycle.to_string(),
        "--give-up-after",
        give_up,
    ])
}

#[test]
fn transient_errors_and_latency_everywhere_agents_back_off_and_finish_once() {
    let mut f = Faulty::start(11);
    let s0 = f.image("s0.raw");
    f.faults("seed=11\nop=any kind=error p=0.1\nop=any kind=latency ms=3 p=0.5");
    let out = succeeded(
        &f.agent(&[
            "protect",
            "--vm",
            "vm1",
            "--disk",
            &format!("{}:os", s0.display()),
            "--json",
        ]),
        "protect under transient faults",
    );
    let sum: Value = serde_json::from_str(&out).unwrap();
    let disk = &f.vm("vm1")["disks"][0];
    assert_eq!(
        (&disk["data_blocks"], &disk["blocks_received"]),
        (&sum["disks"][0]["data_blocks"], &disk["blocks"]),
        "after retries the server counts other blocks than the agent sent: {disk} / {sum}"
    );
    let mut states = vec![s0];
    let mut prev = ZERO_GUID.to_string();
    for k in 1..=3u64 {
        let next = f.dir.join(format!("s{k}.raw"));
        let log = f.dir.join(format!("c{k}.hrl"));
        let mut rng = Rng(f.rng.next());
        prev = next_cycle(
            &mut rng,
            &states[k as usize - 1],
            &next,
            &log,
            &prev,
            3,
            MIB / 4,
        );
        succeeded(
            &replicate(&f, "vm1", &log, k, "10m"),
            "replicate under faults",
        );
        states.push(next);
    }
    // Merge under faults too: a run the store broke fails recoverably and is run again.
    let mut merged = false;
    for _ in 0..40 {
        if f.server
            .cli(&["merge", "--vm", "vm1", "--through", "c2"])
            .status
            .success()
        {
            merged = true;
            break;
        }
    }
    assert!(merged, "merge never got through transient store errors");
    f.faults("# healed");

    // Every data block counted once, every log once: retries applied nothing twice.
    let vm = f.vm("vm1");
    let disk = &vm["disks"][0];
    assert_eq!(disk["state"], "complete");
    assert_eq!(
        disk["blocks_received"], disk["blocks"],
        "blocks received twice or not at all: {disk}"
    );
    assert_eq!(
        disk["journal_length"], 1,
        "c3 is the one log left after the merge: {disk}"
    );
    assert_eq!(f.points("vm1"), vec![2, 3], "each log is one point, once");
    f.export_equals("vm1", "c2", &states[2]);
    f.export_equals("vm1", "latest", &states[3]);
    f.report("transient errors and latency");
    assert!(f.injected("error") > 0, "no fault ever fired");
}

/// What the agent printed when it stopped (its last error line).
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The agent retried a recoverable `code` until told to give up (exit 3).
fn gave_up(o: &Output, code: &str) {
    assert_eq!(o.status.code(), Some(3), "{}", stderr(o));
    assert!(stderr(o).contains(code), "not {code}: {}", stderr(o));
}

#[test]
fn a_store_failing_every_call_gives_recoverable_errors_and_the_server_stays_up() {
    let (mut f, _, s1, log) = Faulty::protected(21);

    f.faults("op=any kind=error");
    // The agent retries (the error is recoverable) and gives up only when told to: exit 3.
    let o = replicate(&f, "vm1", &log, 1, "1s");
    gave_up(&o, "store_unavailable");
    // The API says what and that it is worth retrying, with Retry-After.
    let spec = serde_json::json!({"disks": [{"id": "os", "size": DISK}]});
    let r: Result<Value, _> =
        f.rt()
            .block_on(f.host.send_json(Method::PUT, "/v1/agent/vms/vm2", &spec));
    match r {
        Err(ClientError::Api {
            status,
            body,
            retry_after,
        }) => {
            assert_eq!(
                (status.as_u16(), body.code.as_str(), body.recoverable),
                (503, "store_unavailable", true)
            );
            assert!(retry_after.is_some(), "503 without Retry-After");
        }
        other => panic!("enable protection over a dead store: {other:?}"),
    }
    assert_eq!(f.healthz(), 503, "/healthz hides a dead store");
    let o = f.server.cli(&["merge", "--vm", "vm1", "--all"]);
    assert!(!o.status.success());
    assert!(f.server.alive(), "the server died with its store");

    f.faults("# the store is back");
    assert_eq!(f.healthz(), 200);
    succeeded(
        &replicate(&f, "vm1", &log, 1, "1m"),
        "replicate after the outage",
    );
    assert_eq!(f.points("vm1"), vec![0, 1]);
    f.export_equals("vm1", "c1", &s1);
    let _: Value = f
        .rt()
        .block_on(f.host.send_json(Method::PUT, "/v1/agent/vms/vm2", &spec))
        .unwrap();
    f.report("a store failing every call");
}

#[test]
fn a_full_disk_fails_cleanly_commits_nothing_and_recovers_when_space_returns() {
    let (mut f, _, s1, log) = Faulty::protected(31);
    let t0 = f.image("t0.raw");
    let disk_t = format!("{}:os", t0.display());
    let protect_t = |f: &Faulty| {
        f.agent(&[
            "protect",
            "--vm",
            "vm2",
            "--disk",
            &disk_t,
            "--give-up-after",
            "1s",
        ])
    };

    // Completely full: every write fails as ENOSPC does; nothing at all is written.
    let vault = f.server.vault_objects("");
    f.faults("kind=nospace");
    let o = replicate(&f, "vm1", &log, 1, "1s");
    gave_up(&o, "store_full");
    gave_up(&protect_t(&f), "store_full");
    assert_eq!(
        f.server.vault_objects(""),
        vault,
        "a full store took writes"
    );

    // Full just as the commit comes: a log's frames are stored but its journal entry is not;
    // a disk's blocks arrive but its block map does not. Neither may be visible.
    f.faults(
        "op=put kind=nospace prefix=records/\nop=put_if_absent kind=nospace prefix=records/\n\
         op=put kind=nospace prefix=maps/\nop=put_if_absent kind=nospace prefix=maps/",
    );
    let o = replicate(&f, "vm1", &log, 1, "1s");
    gave_up(&o, "store_full");
    let d = &f.vm("vm1")["disks"][0];
    assert_eq!(
        d["journal_length"], 0,
        "a log whose commit failed is in the journal: {d}"
    );
    assert_eq!(f.points("vm1"), vec![0]);
    f.faults("op=put kind=nospace prefix=maps/\nop=put_if_absent kind=nospace prefix=maps/");
    gave_up(&protect_t(&f), "store_full");
    let v2 = f.vm("vm2");
    assert_ne!(
        v2["disks"][0]["state"], "complete",
        "a disk without a map is complete: {v2}"
    );
    let out = f.dir.join("vm2.raw");
    assert!(
        !f.server
            .export_os_raw("vm2", "latest", &out)
            .status
            .success(),
        "a disk without a map exports"
    );
    assert!(f.server.alive());

    // Space returns: the same requests succeed, once.
    f.faults("# space again");
    succeeded(&replicate(&f, "vm1", &log, 1, "1m"), "replicate with space");
    assert_eq!(f.points("vm1"), vec![0, 1]);
    assert_eq!(f.vm("vm1")["disks"][0]["journal_length"], 1);
    f.export_equals("vm1", "c1", &s1);
    let sum: Value = serde_json::from_str(&succeeded(
        &f.agent(&["protect", "--vm", "vm2", "--disk", &disk_t, "--json"]),
        "protect with space",
    ))
    .unwrap();
    assert_eq!(
        sum["disks"][0]["uploaded_blocks"], 0,
        "blocks stored before the disk filled up were sent again: {sum}"
    );
    f.export_equals("vm2", "latest", &t0);
    f.report("a full disk");
}
