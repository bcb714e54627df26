//! A real server over a store that fails on purpose (`DRVAULT_FAULTS=@file`, re-read while it
//! runs, so each test breaks the store and heals it again without a restart):
//!
//! * transient errors and latency on every operation: the agents back off and finish, and no
//!   block or log is applied twice;
//! * a store that fails every call: recoverable error codes with Retry-After, `/healthz` says
//!   so, the server stays up, and everything works again once the store does;
//! * a full disk (the wrapper's `nospace`, an ENOSPC as the local backend reports it):
//!   `store_full`, nothing committed — no recovery point, no journal entry, no completed disk
//!   — and the same requests succeed once space returns;
//! * torn puts (a write that never completes) over uploads, log uploads and a merge: retried,
//!   counted once, nothing half-visible, every point exact after a restart;
//! * writes lost after their acknowledgement: what drvault promises (see that test's doc):
//!   never read as wrong data, found by verify or before the acknowledgement, healed by resync.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;
use drvault::client::{Client, ClientError};
use reqwest::Method;
use serde_json::Value;

const DISK: u64 = 8 * MIB;
const CONFIG: &str = "[vault]\nblock_size = 1048576\n\n[replica]\nmerge_interval_s = 0\n";

struct Faulty {
    _t: tempfile::TempDir,
    dir: PathBuf,
    server: Server,
    rules: FaultRules,
    creds: PathBuf,
    host: Client,
    rng: Rng,
}

impl Faulty {
    /// A server whose store takes its faults from a file, empty at the start.
    fn start(seed: u64) -> Faulty {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let (server, rules) = FaultRules::start(&dir, Some(CONFIG));
        let creds = server.add_host("hv", None);
        let host = server.client_with(&Server::host_token(&creds));
        Faulty {
            _t: t,
            dir,
            server,
            rules,
            creds,
            host,
            rng: Rng(seed),
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

    /// Writes the next state of `vm1`'s disk from the last of `states` (3 random writes of up to
    /// `max_len` bytes), replicates its log as cycle `states.len()` and pushes the state.
    /// Returns the log's id, the next cycle's parent.
    fn replicate_cycle(
        &mut self,
        states: &mut Vec<PathBuf>,
        prev: &str,
        max_len: u64,
        what: &str,
    ) -> String {
        let k = states.len();
        let next = self.dir.join(format!("s{k}.raw"));
        let log = self.dir.join(format!("c{k}.hrl"));
        let mut rng = Rng(self.rng.next());
        let id = next_cycle(&mut rng, &states[k - 1], &next, &log, prev, 3, max_len);
        succeeded(&replicate(self, "vm1", &log, k as u64, "10m"), what);
        states.push(next);
        id
    }

    /// Replaces the fault rules and waits until the server has taken them.
    fn faults(&mut self, rules: &str) {
        self.rules.set(&self.server, rules);
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
        self.server.export_os_equals(vm, point, expected, &self.dir);
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
    for _ in 1..=3 {
        prev = f.replicate_cycle(&mut states, &prev, MIB / 4, "replicate under faults");
    }
    // Merge under faults too: a run the store broke fails recoverably and is run again.
    let merged = merge_retrying(&f, "vm1", "c2");
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

/// The log directories (`logs/<vm>/<disk>/<log>`) in the local vault.
fn log_dirs(f: &Faulty) -> Vec<String> {
    let mut dirs: Vec<String> = f
        .server
        .vault_objects("logs")
        .iter()
        .filter_map(|k| k.rsplit_once('/').map(|(d, _)| d.to_string()))
        .collect();
    dirs.dedup();
    dirs
}

/// `drvault verify --json`: the report and whether it said "clean" (exit 0; 2 is "damaged").
/// `drvault merge --through` rerun until it succeeds (a run the store broke fails
/// recoverably); false when 40 runs did not get through.
fn merge_retrying(f: &Faulty, vm: &str, through: &str) -> bool {
    (0..40).any(|_| {
        f.server
            .cli(&["merge", "--vm", vm, "--through", through])
            .status
            .success()
    })
}

fn verify(f: &Faulty) -> (Value, bool) {
    let o = f.server.cli(&["verify", "--json"]);
    let code = o.status.code();
    assert!(
        code == Some(0) || code == Some(7),
        "verify failed: {}",
        stderr(&o)
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["clean"].as_bool(), Some(code == Some(0)), "{r}");
    (r, code == Some(0))
}

/// Torn puts (the write never completes: the caller gets an error and nothing is stored, as a
/// cut-off PUT to an object store; a local write cut short by a crash is the crash harness's
/// part) on the first puts of each family and then sprinkled over every put of two initial
/// replications, three log uploads and a merge: the agents and the operator retry and finish;
/// every block and log is counted once; no log whose upload broke off leaves frames or a point
/// behind; verify finds nothing referenced missing; and after a restart (which reads everything
/// back from the store, not from memory) every point exports exactly as the source was.
#[test]
fn torn_puts_are_retried_and_leave_nothing_half_visible() {
    let mut f = Faulty::start(41);
    let s0 = f.image("s0.raw");
    let t0 = f.image("t0.raw");
    // The first puts of each family are torn for sure, then one put in five at random.
    f.faults(
        "seed=41\nop=any prefix=records/ kind=torn times=2\nop=any prefix=chunks/ kind=torn times=2\n\
         op=any prefix=maps/ kind=torn times=1\nop=any prefix=logs/ kind=torn times=2\n\
         op=any kind=torn p=0.2",
    );
    for (vm, img, parallel) in [("vm1", &s0, "1"), ("vm2", &t0, "4")] {
        let sum: Value = serde_json::from_str(&succeeded(
            &f.agent(&[
                "protect",
                "--vm",
                vm,
                "--disk",
                &format!("{}:os", img.display()),
                "--parallel",
                parallel,
                "--json",
            ]),
            "protect under torn puts",
        ))
        .unwrap();
        let disk = &f.vm(vm)["disks"][0];
        assert_eq!(disk["state"], "complete", "{disk}");
        assert_eq!(
            (&disk["blocks_received"], &disk["data_blocks"]),
            (&disk["blocks"], &sum["disks"][0]["data_blocks"]),
            "blocks counted twice or not at all: {disk} / {sum}"
        );
    }
    let mut states = vec![s0];
    let mut prev = ZERO_GUID.to_string();
    for k in 1..=3u64 {
        prev = f.replicate_cycle(&mut states, &prev, MIB / 2, "replicate under torn puts");
        // Each log is one point from its acknowledgement on, and nothing of the attempts the
        // torn puts broke off is left: one log directory per accepted log.
        assert_eq!(f.points("vm1"), (0..=k).collect::<Vec<_>>());
        assert_eq!(log_dirs(&f).len(), k as usize, "{:?}", log_dirs(&f));
    }
    let merged = merge_retrying(&f, "vm1", "c1");
    assert!(merged, "merge never got through torn puts");
    let torn = f.injected("torn");
    f.report("torn puts");
    // Which families the torn puts hit (the server logs each failed request with its key).
    let log = f.server.log();
    let hit: BTreeSet<&str> = ["chunks/", "maps/", "records/", "logs/", "stage/"]
        .into_iter()
        .filter(|p| {
            log.contains(&format!("injected torn fault on put_if_absent of \"{p}"))
                || log.contains(&format!("injected torn fault on put of \"{p}"))
        })
        .collect();
    assert!(torn >= 7, "{torn} torn puts");
    for family in ["chunks/", "maps/", "records/", "logs/"] {
        assert!(hit.contains(family), "no torn put of {family}: {hit:?}");
    }
    f.faults("# healed");

    let disk = &f.vm("vm1")["disks"][0];
    assert_eq!(disk["journal_length"], 2, "c2 and c3 left: {disk}");
    let (r, clean) = verify(&f);
    assert!(clean, "torn puts left something referenced missing: {r}");
    // A restart reads the records back from the store: what was acknowledged is there, what
    // was torn is not.
    f.server.stop();
    f.server.restart();
    assert_eq!(f.points("vm1"), vec![1, 2, 3]);
    for (k, state) in states.iter().enumerate().skip(1) {
        f.export_equals("vm1", &format!("c{k}"), state);
    }
    f.export_equals("vm2", "latest", &t0);
}

/// Exports a point of `vm` as raw: the bytes, or the CLI's error text.
fn export(f: &Faulty, vm: &str, point: &str) -> Result<Vec<u8>, String> {
    let out = f.dir.join(format!("x-{vm}-{point}.raw"));
    let _ = std::fs::remove_file(&out);
    let o = f.server.export_os_raw(vm, point, &out);
    if o.status.success() {
        Ok(std::fs::read(&out).unwrap())
    } else {
        assert!(!out.exists(), "a failed export left {}", out.display());
        Err(stderr(&o))
    }
}

/// Writes lost after their acknowledgement (the `lost` fault: the put reports success, nothing
/// is stored), and what drvault promises about them.
///
/// drvault treats a store's acknowledgement as durable: the local backend fsyncs every object
/// before acknowledging it, Azure and S3 acknowledge durable writes only; on a working disk an
/// acknowledged object is not lost. Should a store lose one anyway (a lying disk cache, a
/// backup restored without its newest objects), drvault promises:
///
/// 1. no point is ever read as wrong data: a point that needs a lost object fails to export
///    (`object_missing`); the gap is never filled with zeros or older contents;
/// 2. a lost log frame never gets as far as an acknowledgement: the server reads every log
///    back before it acknowledges it, and a frame missing there is a recoverable store failure
///    (`store_unavailable`), so the agent's retry stores the log again;
/// 3. `drvault verify` reports every other lost object as missing and marks the points that
///    need it damaged: they refuse export with `point_damaged`, every other point exports
///    exactly;
/// 4. a resync heals: it re-sends the blocks whose chunks verify registered (the chunk is
///    stored again, so older points that share it read again too), and its new point is
///    sound; points that need a lost log object (which a retried upload cannot bring back: an
///    accepted log is acknowledged again without its body) stay refused until a merge through
///    the resynced point retires them. After that verify is clean.
#[test]
fn writes_lost_after_ack_are_found_never_read_wrong_and_healed_by_resync() {
    let mut f = Faulty::start(51);
    let s0 = f.image("s0.raw");
    let t0 = f.image("t0.raw");
    let protect = |f: &Faulty, vm: &str, img: &Path| {
        succeeded(
            &f.agent(&[
                "protect",
                "--vm",
                vm,
                "--disk",
                &format!("{}:os", img.display()),
            ]),
            "protect",
        )
    };

    // vm1: two chunks of the initial replication are acknowledged and never stored.
    f.faults("op=put_if_absent prefix=chunks/ kind=lost times=2");
    protect(&f, "vm1", &s0);
    assert_eq!(f.injected("lost-after-ack"), 2);
    f.faults("# stored again");
    let e = export(&f, "vm1", "c0").expect_err("c0 exported without two of its chunks");
    assert!(e.contains("object_missing"), "{e}");

    // vm2: a frame of its first log is lost; the read-back before the acknowledgement finds
    // the gap, and the agent's retry stores the log again.
    protect(&f, "vm2", &t0);
    let mut states = vec![t0];
    let mut prev = ZERO_GUID.to_string();
    let mut rng = Rng(52);
    let mut cycle = |f: &mut Faulty, states: &mut Vec<PathBuf>, rules: &dyn Fn(&str) -> String| {
        let k = states.len();
        let next = f.dir.join(format!("t{k}.raw"));
        let log = f.dir.join(format!("t{k}.hrl"));
        let uid = next_cycle(&mut rng, &states[k - 1], &next, &log, &prev, 3, MIB / 2);
        f.faults(&rules(&uid));
        let o = replicate(f, "vm2", &log, k as u64, "1m");
        f.faults("# stored again");
        prev = uid;
        states.push(next);
        o
    };
    let o = cycle(&mut f, &mut states, &|_| {
        "op=any prefix=logs/ kind=lost times=1".into()
    });
    succeeded(&o, "replicate while a frame is lost");
    assert_eq!(f.injected("lost-after-ack"), 3);
    assert_eq!(f.points("vm2"), vec![0, 1]);
    f.export_equals("vm2", "c1", &states[1]);

    // The extent list of the next log is lost after the read-back: the log is acknowledged.
    let dir = log_dirs(&f)[0].clone();
    let disk_prefix = dir.rsplit_once('/').unwrap().0.to_string();
    let o = cycle(&mut f, &mut states, &|uid| {
        let key_id = drvault::journal::log_key_id(&uid.parse().unwrap());
        format!("op=any prefix={disk_prefix}/{key_id}/extents kind=lost times=1")
    });
    succeeded(&o, "replicate while the extent list is lost");
    assert_eq!(f.injected("lost-after-ack"), 4);
    assert_eq!(f.points("vm2"), vec![0, 1, 2]);

    // Before verify: every point exports exactly or fails; none is read wrong.
    let expected: Vec<(&str, &str, PathBuf)> = vec![
        ("vm1", "c0", s0.clone()),
        ("vm2", "c0", states[0].clone()),
        ("vm2", "c1", states[1].clone()),
        ("vm2", "c2", states[2].clone()),
    ];
    for (vm, p, img) in &expected {
        match export(&f, vm, p) {
            Ok(b) => assert!(b == std::fs::read(img).unwrap(), "{vm}/{p} read wrong data"),
            Err(e) => assert!(e.contains("object_missing"), "{vm}/{p}: {e}"),
        }
    }

    // Verify finds exactly the three lost objects that were acknowledged and marks their
    // points; the others export exactly.
    let (r, clean) = verify(&f);
    assert!(!clean);
    let damaged = r["damaged"].as_array().unwrap().clone();
    let mut families: Vec<&str> = damaged
        .iter()
        .map(|o| o["family"].as_str().unwrap())
        .collect();
    families.sort();
    assert_eq!(families, ["chunk", "chunk", "log"], "{r:#}");
    for o in &damaged {
        assert_eq!(o["problem"], "missing", "{o}");
        let key = o["key"].as_str().unwrap();
        assert!(
            !f.server.data_dir.join("vault").join(key).exists(),
            "{key} reported missing but present"
        );
    }
    let damaged_points = |f: &Faulty, vm: &str| -> Vec<String> {
        let ps: Value = serde_json::from_str(&succeeded(
            &f.server.cli(&["points", "--vm", vm, "--json"]),
            "points",
        ))
        .unwrap();
        ps.as_array()
            .unwrap()
            .iter()
            .filter(|p| p["damaged"] == true)
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(damaged_points(&f, "vm1"), ["c0"]);
    assert!(damaged_points(&f, "vm2").contains(&"c2".to_string()));
    for (vm, p, img) in &expected {
        let bad = damaged_points(&f, vm).iter().any(|d| d == p);
        match export(&f, vm, p) {
            Ok(b) if !bad => assert!(b == std::fs::read(img).unwrap(), "{vm}/{p}"),
            Err(e) if bad => assert!(e.contains("point_damaged"), "{vm}/{p}: {e}"),
            other => panic!("{vm}/{p} damaged {bad}: {:?}", other.map(|b| b.len())),
        }
    }

    // Heal: a resync of each VM from its source.
    for (vm, src) in [("vm1", &s0), ("vm2", &states[2])] {
        succeeded(
            &f.server.cli(&["resync", "--vm", vm, "--now"]),
            "open a resync",
        );
        let s: Value = serde_json::from_str(&succeeded(
            &f.agent(&[
                "resync",
                "--vm",
                vm,
                "--disk",
                "os",
                "--json",
                src.to_str().unwrap(),
            ]),
            "resync",
        ))
        .unwrap();
        assert_eq!(s["state"], "committed", "{s}");
    }
    // The next verify finds vm1's chunks stored again (the register still holds them until a
    // verify reads them back); vm2's point through the lost extent list stays damaged.
    let (r, clean) = verify(&f);
    assert!(!clean, "{r:#}");
    let chunk_keys: BTreeSet<&str> = damaged
        .iter()
        .filter(|o| o["family"] == "chunk")
        .map(|o| o["key"].as_str().unwrap())
        .collect();
    let healed: BTreeSet<&str> = r["healed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(healed, chunk_keys, "{r:#}");
    assert!(damaged_points(&f, "vm1").is_empty());
    f.export_equals("vm1", "c0", &s0);
    f.export_equals("vm1", "latest", &s0);
    f.export_equals("vm2", "latest", &states[2]);
    assert!(damaged_points(&f, "vm2").contains(&"c2".to_string()));
    // A merge through the resynced point retires the point that needed the lost extent list.
    succeeded(&f.server.cli(&["merge", "--vm", "vm2", "--all"]), "merge");
    let (r, clean) = verify(&f);
    assert!(clean, "{r:#}");
    assert!(damaged_points(&f, "vm2").is_empty());
    f.export_equals("vm2", "latest", &states[2]);
    f.report("writes lost after ack");
}

/// `key rotate` on a full disk: the store is full and the key file's own writes fail with
/// ENOSPC (its temporary file is /dev/full, which answers every write so). The answer is 503
/// `store_full`, recoverable, like every other write, with master.key unchanged; once space
/// returns the same rotation succeeds.
#[test]
fn key_rotation_on_a_full_disk_is_store_full_and_changes_nothing() {
    let mut f = Faulty::start(141);
    f.faults("kind=nospace");
    let key_file = f.server.data_dir.join("master.key");
    let before = std::fs::read(&key_file).unwrap();
    let tmp = f.server.data_dir.join("master.key.new");
    std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
    let op = f.server.operator();
    let rt = f.rt();
    let rotate = || {
        rt.block_on(op.send_json::<_, Value>(
            Method::POST,
            "/v1/keys/rotate",
            &serde_json::json!({}),
        ))
    };
    match rotate() {
        Err(ClientError::Api { status, body, .. }) => {
            assert_eq!(status.as_u16(), 503, "{body:?}");
            assert_eq!(body.code, "store_full", "{body:?}");
            assert!(body.recoverable, "{body:?}");
            assert!(body.message.contains("nothing changed"), "{body:?}");
        }
        other => panic!("rotation on a full disk answered {other:?}"),
    }
    let o = f.server.cli(&["key", "rotate"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("[store_full]"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        before,
        "master.key changed"
    );
    let keys: Value = rt.block_on(op.get_json("/v1/keys")).unwrap();
    assert_eq!(keys["active"], 1, "{keys}");
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1, "{keys}");

    // Space returns.
    std::fs::remove_file(&tmp).unwrap();
    f.faults("# space again");
    let keys = rotate().expect("rotation once space returned");
    assert_eq!(keys["active"], 2, "{keys}");
    assert_eq!(keys["keys"].as_array().unwrap().len(), 2, "{keys}");
    assert_ne!(std::fs::read(&key_file).unwrap(), before);
}
