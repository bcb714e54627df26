//! Crash harness: the real server binary is killed with SIGKILL at random moments while agents
//! and operators work against it, restarted on the same address and data directory, and checked.
//!
//! Each round protects a new VM and takes it through the whole life the server supports today:
//!
//! 1. acknowledged blocks: this test uploads blocks itself and records every acknowledgement; after
//!    each restart every acknowledged block must still be held (`blocks/query` says none missing);
//! 2. initial replication with `drvault agent protect` (the agent retries through the kills);
//! 3. three replication cycles: logs made with `drvault hrl diff` and sent with `drvault agent
//!    replicate`; after each restart every acknowledged log is still a recovery point;
//! 4. every retained point exported (`drvault export --point cN`) equals the source at that cycle;
//! 5. resync: the source changes in place behind the replica's back (no log), `drvault resync
//!    --now` opens a session (rerun until one is open) and `drvault agent resync` runs under kills
//!    until it reports the session committed; the new point is acknowledged like a log, exports as
//!    the changed source, every older point still exports as before, and a rerun after the
//!    commit is told so and sends nothing;
//! 6. `drvault merge --all` (rerun until it succeeds), then the latest point exports correctly;
//! 7. a test failover (rerun until a run succeeds: runs a kill interrupted end `failed`), whose
//!    fixed VHD holds the latest point, then its cleanup (rerun until it succeeds).
//!
//! While the server is down after each kill, every object the store lists must open as a whole
//! sealed object (a write cut short is never visible), and after each restart every block and
//! log acknowledged so far must still be there.
//!
//! Two tests run the harness: one on a local vault (the default suite: 200 kills), one with the
//! vault on Azure Blob Storage (Azurite, fewer kills: the emulator is slower). There the listing
//! comes from object_store directly, so blobs drvault's own listing would skip are checked too.
//! A missing Azurite fails that test unless `DRVAULT_SKIP_AZURITE=1` (see
//! `support/emulators.rs`).
//!
//! The kill schedule comes from a seed (`DRVAULT_CRASH_SEED`, random by default) printed at the
//! start and in every failure. `DRVAULT_CRASH_KILLS` sets how many kills to reach (default 200),
//! `DRVAULT_CRASH_AZURE_KILLS` the same for the Azurite test (default 50). Process kills only:
//! the page cache survives them, so this checks crash consistency of the server's write order,
//! not durability across power loss (that is fsync's job).

use crate::common;
use crate::emulators;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use drvault::chunk::keys::KeyRing;
use drvault::chunk::seal;
use drvault::client::Client;
use drvault::file_formats::ObjectKind;
use drvault::store::{Key, Store};
use emulators::Azurite;
use serde_json::{json, Value};

const DISK: u64 = 16 * MIB;
const CONFIG: &str = "[vault]\nblock_size = 1048576\n\n[replica]\nmerge_interval_s = 0\n";
const AZURE_CONTAINER: &str = "crash";

/// Where the server keeps its vault, and so where the harness lists and reads objects.
enum Vault {
    /// `data/vault` under the server's data directory.
    Local,
    /// A container on a private Azurite.
    Azure(Azurite),
}

struct Harness {
    dir: PathBuf,
    vault: Vault,
    server: Server,
    creds: PathBuf,
    host_token: String,
    rng: Rng,
    seed: u64,
    rt: tokio::runtime::Runtime,
    kills: u32,
    /// Kills that landed while an agent, an operator command or the uploader was at work.
    kills_in_flight: u32,
    /// What has been acknowledged so far, checked after every restart.
    acked_blocks: Arc<Mutex<Vec<(String, u64, String)>>>,
    acked_logs: Vec<(String, u64)>,
    trace: Vec<String>,
    start: Instant,
    /// Objects already opened successfully, with their size.
    verified: HashMap<String, u64>,
}

impl Harness {
    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.trace.iter().rev().take(12).collect();
        panic!(
            "crash harness (DRVAULT_CRASH_SEED={}) after {} kills: {what}\nlast events (newest first): {tail:#?}\nserver log tail:\n{}",
            self.seed,
            self.kills,
            tail_of(&self.server.log(), 4000)
        );
    }

    /// Records an event (with the time since the start) for the failure message; also printed,
    /// so `--nocapture` shows where the time goes.
    fn note(&mut self, what: String) {
        let line = format!("{:7.2}s {what}", self.start.elapsed().as_secs_f64());
        eprintln!("{line}");
        self.trace.push(line);
    }

    fn operator(&self) -> Client {
        self.server.operator()
    }

    /// SIGKILL, restart on the same address, then check that nothing acknowledged was lost.
    fn kill_and_restart(&mut self, in_flight: bool, phase: &str) {
        self.server.kill9();
        self.kills += 1;
        if in_flight {
            self.kills_in_flight += 1;
        }
        self.note(format!("kill {} during {phase}", self.kills));
        // Nothing writes to the vault while the server is down: check what it left.
        self.check_objects_whole();
        self.server.restart();
        self.note("restarted".into());
        self.check_acknowledged();
        self.note("acknowledged data checked".into());
    }

    fn check_acknowledged(&mut self) {
        let op = self.operator();
        let host = self.server.client_with(&self.host_token).acting_for(None);
        let blocks = self.acked_blocks.lock().unwrap().clone();
        let logs = self.acked_logs.clone();
        let r: Result<(), String> = self.rt.block_on(async {
            // Group acknowledged blocks by VM and ask the server which it lacks.
            let vms: BTreeSet<&String> = blocks.iter().map(|(vm, _, _)| vm).collect();
            for vm in vms {
                let q: Vec<Value> = blocks
                    .iter()
                    .filter(|(v, _, _)| v == vm)
                    .map(|(_, i, h)| json!({"index": i, "hash": h}))
                    .collect();
                let view: Value = host
                    .get_json(&format!("/v1/agent/vms/{vm}"))
                    .await
                    .map_err(|e| format!("VM {vm} after restart: {e}"))?;
                if view["disks"][0]["state"] == "complete" {
                    continue;
                }
                let missing: Value = host
                    .send_json(
                        reqwest::Method::POST,
                        &format!("/v1/agent/vms/{vm}/disks/os/blocks/query"),
                        &json!({ "blocks": q }),
                    )
                    .await
                    .map_err(|e| format!("query {vm}: {e}"))?;
                if missing["missing"].as_array().map(|m| !m.is_empty()) != Some(false) {
                    return Err(format!(
                        "VM {vm}: acknowledged blocks lost after a kill: {}",
                        missing["missing"]
                    ));
                }
            }
            for (vm, cycle) in &logs {
                let points: Value = op
                    .get_json(&format!("/v1/vms/{vm}/points"))
                    .await
                    .map_err(|e| format!("points of {vm}: {e}"))?;
                let found = points
                    .as_array()
                    .map(|ps| ps.iter().any(|p| p["cycle"].as_u64() >= Some(*cycle)))
                    .unwrap_or(false);
                if !found {
                    return Err(format!(
                        "VM {vm}: acknowledged log of cycle {cycle} is no recovery point: {points}"
                    ));
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Every object the store lists opens as the sealed object of its kind under its key: a
    /// write the kill cut short must not be visible. Objects are checked once (they are
    /// immutable: content-addressed or versioned create-only); one seen again with another size
    /// is checked again.
    fn check_objects_whole(&mut self) {
        let keys = match KeyRing::load(&self.server.data_dir.join("master.key")) {
            Ok(k) => k,
            Err(e) => self.fail(format!("the master key file after a kill: {e}")),
        };
        let listed = match self.list_vault() {
            Ok(l) => l,
            Err(e) => self.fail(e),
        };
        let mut bad = Vec::new();
        for (name, size) in listed {
            if self.verified.get(&name) == Some(&size) {
                continue;
            }
            // A pack is sealed pieces laid end to end, found through the block maps that
            // name them (offset, sealed length), not one sealed object: here only its first
            // piece's header is checked; the server's verify at the end opens every piece the
            // maps reference.
            if name.starts_with("packs/") {
                match self.read_object(&name) {
                    Ok(b)
                        if b.starts_with(b"DRVS")
                            && b.get(5) == Some(&(ObjectKind::Piece as u8)) =>
                    {
                        self.verified.insert(name, size);
                    }
                    Ok(b) => bad.push(format!("{name}: {} bytes, not a pack of pieces", b.len())),
                    Err(e) => bad.push(format!("{name}: {e}")),
                }
                continue;
            }
            let opened = self.read_object(&name).and_then(|bytes| {
                match bytes.get(5).and_then(|k| ObjectKind::from_u8(*k)) {
                    Some(kind) => seal::open(&keys, kind, &name, bytes).map_err(|e| e.to_string()),
                    None => Err(format!("{size} bytes, no object kind")),
                }
            });
            match opened {
                Ok(_) => {
                    self.verified.insert(name, size);
                }
                Err(e) => bad.push(format!("{name}: {e}")),
            }
        }
        if !bad.is_empty() {
            self.fail(format!(
                "half-written objects visible after a kill: {bad:#?}"
            ));
        }
    }

    /// Every object in the vault with its size. Locally what the server's store lists (the
    /// local backend's own staging files are invisible to it); on Azure every blob, listed
    /// without drvault's code in between.
    fn list_vault(&self) -> Result<Vec<(String, u64)>, String> {
        match &self.vault {
            Vault::Azure(az) => Ok(self.rt.block_on(az.objects(AZURE_CONTAINER))),
            Vault::Local => {
                let vault_dir = self.server.data_dir.join("vault");
                let store = Store::open(&format!("file://{}", vault_dir.display()), &[])
                    .map_err(|e| format!("opening the local vault: {e}"))?;
                let tops: Vec<String> = std::fs::read_dir(&vault_dir)
                    .map(|rd| {
                        rd.flatten()
                            .filter(|e| e.path().is_dir())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let mut listed = Vec::new();
                for top in &tops {
                    let prefix = Key::new(&[top]).ok_or_else(|| {
                        format!("vault directory holds an unexpected entry {top:?}")
                    })?;
                    let l = self
                        .rt
                        .block_on(store.list(&prefix))
                        .map_err(|e| format!("listing {top} after a kill: {e}"))?;
                    listed.extend(l.into_iter().map(|o| (o.key.as_str().to_string(), o.size)));
                }
                Ok(listed)
            }
        }
    }

    fn read_object(&self, name: &str) -> Result<Vec<u8>, String> {
        match &self.vault {
            Vault::Azure(az) => self.rt.block_on(az.read(AZURE_CONTAINER, name)),
            Vault::Local => std::fs::read(self.server.data_dir.join("vault").join(name))
                .map_err(|e| format!("read: {e}")),
        }
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("DRVAULT_DATA_DIR", &self.server.data_dir)
            .env("DRVAULT_BACKOFF_SCALE", "0.001")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs a CLI command while killing the server up to `max_kills` times at random moments
    /// (`delay_ms` apart). Returns the command's output, whatever its status.
    fn run_under_kills(
        &mut self,
        args: &[&str],
        max_kills: u32,
        delay_ms: (u64, u64),
        phase: &str,
    ) -> Output {
        let mut child: Child = self.cli(args).spawn().expect("spawn drvault");
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut kills = 0;
        loop {
            let wait = Duration::from_millis(self.rng.range(delay_ms.0, delay_ms.1));
            let until = Instant::now() + wait;
            let mut done = false;
            while Instant::now() < until {
                if child.try_wait().ok().flatten().is_some() {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            if done || kills >= max_kills {
                break;
            }
            self.kill_and_restart(true, phase);
            kills += 1;
        }
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                self.fail(format!(
                    "{phase}: `drvault {args:?}` did not finish within 180 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = child.wait_with_output().expect("child output");
        self.note(format!(
            "{phase}: exit {} after {kills} kills",
            out.status.code().unwrap_or(-1)
        ));
        out
    }

    fn must_succeed(&self, out: &Output, what: &str) {
        if !out.status.success() {
            self.fail(format!(
                "{what} failed ({}):\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }

    /// Runs an operator command until it succeeds, killing the server during the first tries.
    fn until_success(&mut self, args: &[&str], delay_ms: (u64, u64), phase: &str) -> Output {
        for attempt in 0..20 {
            let kills = if attempt < 3 { 1 } else { 0 };
            let out = self.run_under_kills(args, kills, delay_ms, phase);
            if out.status.success() {
                return out;
            }
        }
        self.fail(format!(
            "{phase}: `drvault {args:?}` never succeeded in 20 tries"
        ))
    }

    fn export_equals(&self, vm: &str, point: &str, expected: &Path) {
        let out = self.dir.join(format!("{vm}-{point}.raw"));
        let o = self.server.export_os_raw(vm, point, &out);
        self.must_succeed(&o, &format!("export of {vm} at {point}"));
        if std::fs::read(&out).unwrap() != std::fs::read(expected).unwrap() {
            self.fail(format!(
                "{vm} at point {point} does not export as the source was at that point"
            ));
        }
        std::fs::remove_file(out).unwrap();
    }

    /// Phase 1: this test uploads the blocks of a fresh VM itself and records each
    /// acknowledgement; the server is killed under it several times.
    fn acknowledged_blocks(&mut self, vm: &str, image: &Path) {
        let host = self.server.client_with(&self.host_token);
        let spec = json!({"disks": [{"id": "os", "size": DISK}]});
        let r: Result<Value, _> = self.rt.block_on(host.send_json(
            reqwest::Method::PUT,
            &format!("/v1/agent/vms/{vm}"),
            &spec,
        ));
        if let Err(e) = r {
            self.fail(format!("enable protection of {vm}: {e}"));
        }
        let data = std::fs::read(image).unwrap();
        let acked = self.acked_blocks.clone();
        let done = Arc::new(AtomicBool::new(false));
        let (vm_s, done2) = (vm.to_string(), done.clone());
        // A client of its own: a reqwest connection is driven by the runtime that opened it, and
        // `self.rt` only runs while this thread blocks on it, so a shared pooled connection
        // would stall the uploader's requests until the read timeout.
        let host = self.server.client_with(&self.host_token);
        let uploader = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            for (i, block) in data.chunks(MIB as usize).enumerate() {
                if block.iter().all(|b| *b == 0) {
                    continue;
                }
                let hash = blake3::hash(block).to_hex().to_string();
                let path = format!("/v1/agent/vms/{vm_s}/disks/os/blocks/{i}");
                let body = Bytes::copy_from_slice(block);
                loop {
                    let r: Result<Value, _> = rt.block_on(host.put_bytes(
                        &path,
                        &[("x-drvault-blake3", hash.clone())],
                        body.clone(),
                    ));
                    match r {
                        Ok(_) => {
                            acked.lock().unwrap().push((vm_s.clone(), i as u64, hash));
                            break;
                        }
                        Err(e) if e.recoverable() => std::thread::sleep(Duration::from_millis(10)),
                        Err(e) => panic!("block {i} refused: {e}"),
                    }
                }
            }
            done2.store(true, Ordering::SeqCst);
        });
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(self.rng.range(0, 120)));
            let busy = !done.load(Ordering::SeqCst);
            self.kill_and_restart(busy, "acknowledged block uploads");
        }
        if uploader.join().is_err() {
            self.fail("the block uploader failed".into());
        }
        self.note("uploader done".into());
        self.check_acknowledged();
        // The agent finds every block on the server and only completes the disk.
        let disk = format!("{}:os", image.display());
        let out = self
            .cli(&[
                "agent",
                "protect",
                "--creds",
                self.creds.to_str().unwrap(),
                "--vm",
                vm,
                "--disk",
                &disk,
                "--json",
            ])
            .output()
            .unwrap();
        self.note("protect after the uploader done".into());
        self.must_succeed(&out, "protect after the uploader");
        let sum: Value = serde_json::from_slice(&out.stdout).unwrap();
        if sum["disks"][0]["uploaded_blocks"] != 0 {
            self.fail(format!(
                "blocks acknowledged before kills were sent again: {sum}"
            ));
        }
        self.export_equals(vm, "latest", image);
    }

    /// The resync phase: `source` (the replica's latest point) is copied to `changed` and a few
    /// of its blocks are rewritten in place, as a source that went on without logs; a session
    /// is opened and `drvault agent resync` runs under kills until it reports the session
    /// committed. Returns the cycle of the point the commit made (acknowledged from then on).
    fn resync(&mut self, vm: &str, source: &Path, changed: &Path) -> u64 {
        use std::os::unix::fs::FileExt;
        std::fs::copy(source, changed).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(changed)
            .unwrap();
        for _ in 0..self.rng.range(4, 10) {
            let off = self.rng.range(0, DISK / 4096 - 64) * 4096;
            let len = self.rng.range(1, 64) as usize * 4096;
            let bytes = if self.rng.range(0, 4) == 0 {
                vec![0u8; len]
            } else {
                pseudo_random(len, self.rng.next())
            };
            f.write_all_at(&bytes, off).unwrap();
        }
        drop(f);

        // A run a kill cut off from its answer may have opened the session: look before
        // asking again (a second request while one is open is refused).
        let mut opened = false;
        for attempt in 0..20 {
            let kills = if attempt < 2 { 1 } else { 0 };
            let out = self.run_under_kills(
                &["resync", "--vm", vm, "--now"],
                kills,
                (0, 40),
                "resync start",
            );
            if out.status.success() || self.resync_state(vm) == "active" {
                opened = true;
                break;
            }
        }
        if !opened {
            self.fail(format!("no resync session of {vm} ever opened"));
        }

        let creds = self.creds.to_str().unwrap().to_string();
        let path = changed.to_str().unwrap().to_string();
        let args = [
            "agent",
            "resync",
            "--creds",
            &creds,
            "--vm",
            vm,
            "--disk",
            "os",
            "--json",
            "--give-up-after",
            "120s",
            &path,
        ];
        let mut summary = Value::Null;
        for attempt in 0..20 {
            let kills = if attempt < 3 { 3 } else { 0 };
            let out = self.run_under_kills(&args, kills, (0, 60), "resync");
            if out.status.success() {
                summary = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                if summary["state"] == "committed" {
                    break;
                }
            }
        }
        let Some(cycle) = summary["cycle"]
            .as_u64()
            .filter(|_| summary["state"] == "committed")
        else {
            self.fail(format!("the resync of {vm} never committed: {summary}"));
        };
        self.acked_logs.push((vm.to_string(), cycle));
        let status = self.resync_status(vm);
        if status["state"] != "committed" || status["commit_cycle"].as_u64() != Some(cycle) {
            self.fail(format!(
                "the agent saw the resync of {vm} commit at c{cycle}, the server says {status}"
            ));
        }
        // Done is done: a rerun is told so and sends nothing.
        let out = self.cli(&args).output().unwrap();
        self.must_succeed(&out, "agent resync after the commit");
        let again: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if again["state"] != "committed" || again["bytes_uploaded"] != 0 {
            self.fail(format!("a resync rerun after the commit: {again}"));
        }
        self.check_acknowledged();
        self.export_equals(vm, "latest", changed);
        cycle
    }

    fn resync_status(&self, vm: &str) -> Value {
        let out = self
            .cli(&["resync", "--vm", vm, "--status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn resync_state(&self, vm: &str) -> String {
        self.resync_status(vm)["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// One round: protect, three cycles of logs, exports, resync, merge, failover and cleanup.
    fn round(&mut self, r: u32) {
        let vm = format!("vm{r}");
        // The source at c0..c3, then as the resync finds it.
        let states: Vec<PathBuf> = (0..5)
            .map(|k| self.dir.join(format!("{vm}-s{k}.raw")))
            .collect();
        let regions: Vec<(u64, usize)> = (0..5)
            .map(|_| {
                let off = self.rng.range(0, DISK / 512 - 4096) * 512;
                let len = (self.rng.range(64, 3 * MIB / 512) * 512).min(DISK - off);
                (off, len as usize)
            })
            .collect();
        raw_image(&states[0], DISK, &regions, self.rng.next());

        let ack_vm = format!("acks{r}");
        self.acknowledged_blocks(&ack_vm, &states[0]);

        let creds = self.creds.to_str().unwrap().to_string();
        let disk = format!("{}:os", states[0].display());
        let args = [
            "agent",
            "protect",
            "--creds",
            &creds,
            "--vm",
            &vm,
            "--disk",
            &disk,
            "--parallel",
            "2",
            "--give-up-after",
            "120s",
        ];
        let out = self.run_under_kills(&args, 6, (0, 60), "initial replication");
        self.must_succeed(&out, "agent protect under kills");

        let mut prev = ZERO_GUID.to_string();
        for k in 1..4usize {
            let log = self.dir.join(format!("{vm}-c{k}.hrl"));
            let uid = next_cycle(
                &mut self.rng,
                &states[k - 1],
                &states[k],
                &log,
                &prev,
                3,
                768 * 1024,
            );
            let cycle = k.to_string();
            let args = [
                "agent",
                "replicate",
                "--creds",
                &creds,
                "--vm",
                &vm,
                "--disk",
                "os",
                "--hrl",
                log.to_str().unwrap(),
                "--cycle",
                &cycle,
                "--give-up-after",
                "120s",
            ];
            let out = self.run_under_kills(&args, 2, (0, 150), "log upload");
            self.must_succeed(&out, &format!("agent replicate of cycle {k} under kills"));
            self.acked_logs.push((vm.clone(), k as u64));
            prev = uid;
        }
        self.check_acknowledged();
        for (k, state) in states[..4].iter().enumerate() {
            self.export_equals(&vm, &format!("c{k}"), state);
        }

        let cycle = self.resync(&vm, &states[3], &states[4]);
        for (k, state) in states[..4].iter().enumerate() {
            self.export_equals(&vm, &format!("c{k}"), state);
        }
        self.export_equals(&vm, &format!("c{cycle}"), &states[4]);
        let last = &states[4];

        self.until_success(&["merge", "--vm", &vm, "--all"], (0, 60), "merge");
        self.export_equals(&vm, "latest", last);

        // A run a kill interrupts ends `failed`; one the kill only cut the CLI off from may
        // have succeeded: look before starting another.
        let mut show = Value::Null;
        for attempt in 0..20 {
            show = serde_json::from_slice(
                &self
                    .cli(&["failover", "show", "--vm", &vm, "--json"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap_or(Value::Null);
            if show["record"]["state"] == "succeeded" {
                break;
            }
            if show["record"]["state"] == "running" {
                self.fail(format!(
                    "a failover of {vm} is running with no process behind it: {show}"
                ));
            }
            let kills = if attempt < 3 { 1 } else { 0 };
            let args = ["failover", "--vm", vm.as_str(), "--kind", "test"];
            self.run_under_kills(&args, kills, (0, 200), "test failover");
        }
        if show["record"]["state"] != "succeeded" {
            self.fail(format!("test failover of {vm} never succeeded: {show}"));
        }
        let out_dir = PathBuf::from(show["record"]["output_dir"].as_str().unwrap_or(""));
        let vhd = std::fs::read_dir(&out_dir)
            .ok()
            .and_then(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .find(|p| p.extension().map(|x| x == "vhd").unwrap_or(false))
            })
            .unwrap_or_else(|| self.fail(format!("no VHD in {}", out_dir.display())));
        let bytes = std::fs::read(&vhd).unwrap();
        if bytes.len() as u64 != DISK + 512
            || bytes[..DISK as usize] != std::fs::read(last).unwrap()[..]
        {
            self.fail(format!(
                "the drill's disk {} is not the latest point",
                vhd.display()
            ));
        }
        self.until_success(
            &["failover", "cleanup", "--vm", &vm],
            (0, 40),
            "failover cleanup",
        );
        if out_dir.exists() {
            self.fail(format!("cleanup left {}", out_dir.display()));
        }
        for s in &states {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn tail_of(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

/// The kill schedule's seed: `DRVAULT_CRASH_SEED`, else random.
fn seed() -> u64 {
    std::env::var("DRVAULT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).unwrap();
            u64::from_le_bytes(b)
        })
}

fn kills_from(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs rounds against a server on `vault` (configured by `config`) until `target` kills.
fn run_harness(vault: Vault, config: &str, target: u32, what: &str) {
    let seed = seed();
    eprintln!("crash harness ({what}): DRVAULT_CRASH_SEED={seed}, target {target} kills");
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let listen = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(&dir, Some(config), &listen, &[]);
    let creds = server.add_host("hv", None);
    let host_token = Server::host_token(&creds);
    let mut h = Harness {
        dir,
        vault,
        server,
        creds,
        host_token,
        rng: Rng(seed),
        seed,
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        kills: 0,
        kills_in_flight: 0,
        acked_blocks: Default::default(),
        acked_logs: Vec::new(),
        trace: Vec::new(),
        start: Instant::now(),
        verified: HashMap::new(),
    };
    let start = h.start;
    let mut rounds = 0;
    while h.kills < target {
        h.round(rounds);
        rounds += 1;
    }
    // The server is still healthy and every job it ran has ended.
    let jobs: Value = h.rt.block_on(h.operator().get_json("/v1/jobs")).unwrap();
    let stuck: Vec<&Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "running" && j["kind"] != "enable_protection")
        .collect();
    if !stuck.is_empty() {
        h.fail(format!("jobs still running after the harness: {stuck:?}"));
    }
    // Every object the VMs' points reference opens, pieces in packs included.
    let verify = h.server.cli(&["verify"]);
    if !verify.status.success() {
        h.fail(format!(
            "verify after the harness: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        ));
    }
    eprintln!(
        "crash harness ({what}): {} kills survived ({} during an operation) over {rounds} rounds in {:.0} s; {} blocks and {} logs or resyncs acknowledged, all present; {} objects opened whole; seed {seed}",
        h.kills,
        h.kills_in_flight,
        start.elapsed().as_secs_f64(),
        h.acked_blocks.lock().unwrap().len(),
        h.acked_logs.len(),
        h.verified.len()
    );
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let target = kills_from("DRVAULT_CRASH_KILLS", 200);
    run_harness(Vault::Local, CONFIG, target, "local vault");
}

#[test]
fn sigkill_with_the_vault_on_azurite_loses_nothing_acknowledged() {
    let Some(az) = Azurite::start() else {
        return;
    };
    let config = format!(
        "{}[replica]\nmerge_interval_s = 0\n",
        az.vault_config(AZURE_CONTAINER, "block_size = 1048576\n")
    );
    let target = kills_from("DRVAULT_CRASH_AZURE_KILLS", 50);
    run_harness(Vault::Azure(az), &config, target, "Azurite vault");
}
