//! Several servers on one vault (issue 19).

use std::path::{Path, PathBuf};

use crate::common::cluster::{small_disk, Cluster};
use std::time::{Duration, Instant};

use crate::common::{eventually, next_cycle, succeeded, Rng, ZERO_GUID};

/// Servers in the first tests.
const SERVERS: usize = 3;

/// One VM per server, each protected and replicated (initial replication, then one change-log
/// cycle) through its own server; the hosts were registered on server 0 before the others
/// started. Each VM's latest point then exports exactly as its source disk is.
fn one_vm_per_server(mut cluster: Cluster) {
    let backend = cluster.backend.name();
    cluster.start_server();
    let creds: Vec<PathBuf> = (0..SERVERS)
        .map(|i| cluster.add_host(0, &format!("hv{i}")))
        .collect();
    cluster.start(SERVERS);

    let dir = cluster.dir.clone();
    let mut sources = Vec::new();
    for (i, host_creds) in creds.iter().enumerate() {
        let vm = format!("vm{i}");
        let via = cluster.creds_for(host_creds, i);
        let server = cluster.server(i);
        let c0 = dir.join(format!("{vm}-c0.raw"));
        small_disk(&c0, 8, 100 + i as u64);
        server.protect(&via, &vm, &format!("{}:os", c0.display()), &[]);

        let c1 = dir.join(format!("{vm}-c1.raw"));
        let log = dir.join(format!("{vm}-c1.hrl"));
        let mut rng = Rng(200 + i as u64);
        next_cycle(&mut rng, &c0, &c1, &log, ZERO_GUID, 4, 256 * 1024);
        succeeded(
            &server.cli(&[
                "agent",
                "replicate",
                "--creds",
                via.to_str().unwrap(),
                "--vm",
                &vm,
                "--disk",
                "os",
                "--hrl",
                log.to_str().unwrap(),
                "--cycle",
                "1",
            ]),
            &format!("{backend}: replicate {vm} through server {i}"),
        );
        sources.push((vm, c1));
    }

    let scratch = dir.join("exports");
    std::fs::create_dir_all(&scratch).unwrap();
    for (i, (vm, source)) in sources.iter().enumerate() {
        // Through another server than the one the VM replicated through: each server reads
        // the records the others write.
        let reader = (i + 1) % SERVERS;
        export_equals(&cluster, reader, vm, source, &scratch);
    }
}

/// Exports `vm`'s latest point through server `reader` and checks it equals `source`.
fn export_equals(cluster: &Cluster, reader: usize, vm: &str, source: &Path, scratch: &Path) {
    let backend = cluster.backend.name();
    let out = scratch.join(format!("{vm}-via-s{reader}.raw"));
    let server = cluster.server(reader);
    succeeded(
        &server.export_os_raw(vm, "latest", &out),
        &format!("{backend}: export of {vm} through server {reader}"),
    );
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(source).unwrap(),
        "{backend}: {vm} exported through server {reader} differs from its source disk"
    );
}

#[test]
fn three_servers_on_one_file_vault_each_replicate_a_vm() {
    let dir = tempfile::tempdir().unwrap();
    one_vm_per_server(Cluster::file(dir.path()));
}

#[test]
fn three_servers_on_one_moto_bucket_each_replicate_a_vm() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = Cluster::moto(dir.path()) else {
        return;
    };
    one_vm_per_server(cluster);
}

/// A server of the cluster that is paused (SIGSTOP), then killed (SIGKILL), holds up nothing
/// the others do: a VM is protected and exported through server 0 meanwhile, and the paused
/// server answers again once resumed.
#[test]
fn a_paused_or_dead_server_holds_up_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::file(dir.path());
    cluster.start_server();
    let creds = cluster.add_host(0, "hv0");
    cluster.start(2);

    cluster.pause(1);
    let disk = dir.path().join("web-c0.raw");
    small_disk(&disk, 4, 7);
    cluster
        .server(0)
        .protect(&creds, "web", &format!("{}:os", disk.display()), &[]);
    let scratch = dir.path().join("exports");
    std::fs::create_dir_all(&scratch).unwrap();
    export_equals(&cluster, 0, "web", &disk, &scratch);
    let served = cluster
        .metric(0, "drvault_http_requests_total")
        .expect("server 0 counts its requests");
    assert!(served > 0.0, "server 0 served the protection: {served}");

    cluster.resume(1);
    succeeded(
        &cluster.server(1).cli(&["status", "--wait", "30s"]),
        "status of the resumed server",
    );
    cluster.kill(1);
    export_equals(&cluster, 0, "web", &disk, &scratch);
}

/// VMs in the failure tests, spread over the servers.
const VMS: usize = 12;
/// Lease TTL of the failure tests: short, so takeovers happen within the test's time.
const TTL_S: u64 = 3;

/// An agent command (`drvault agent ARGS`) with fast back-off, run to completion.
fn agent(args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::common::BIN)
        .arg("agent")
        .args(args)
        .env("DRVAULT_BACKOFF_SCALE", "0.02")
        .output()
        .unwrap()
}

/// Credentials for an agent whose first URL is server `first`, then the others in order.
fn creds_via(cluster: &Cluster, creds: &Path, first: usize) -> PathBuf {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(creds).unwrap()).unwrap();
    let n = cluster.servers.len();
    v["server"] = cluster.server(first).url.clone().into();
    v["servers"] = (1..n)
        .map(|k| serde_json::Value::String(cluster.server((first + k) % n).url.clone()))
        .collect::<Vec<_>>()
        .into();
    let stem = creds.file_stem().unwrap().to_string_lossy().into_owned();
    let out = creds.with_file_name(format!("{stem}.via{first}.json"));
    std::fs::write(&out, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    out
}

/// `drvault servers --json` as server `i` answers.
fn servers(cluster: &Cluster, i: usize) -> serde_json::Value {
    serde_json::from_str(&cluster.server(i).cli_ok(&["servers", "--json"])).unwrap()
}

/// The VMs server `holder` holds, as server `asked` sees them.
fn held_by(cluster: &Cluster, asked: usize, holder: usize) -> Vec<String> {
    let id = std::fs::read_to_string(cluster.server(holder).data_dir.join("server.id")).unwrap();
    servers(cluster, asked)["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["id"] == id.trim() && s["live"] == true)
        .flat_map(|s| s["leases"].as_array().unwrap().clone())
        .map(|l| l["vm"].as_str().unwrap().to_string())
        .collect()
}

/// One VM's replication: its disk states by cycle, the chain's last log id, and the server
/// its agent goes to first.
struct Replicated {
    vm: String,
    states: Vec<PathBuf>,
    last_log: String,
    /// The log of each cycle from 1.
    logs: Vec<PathBuf>,
    creds: PathBuf,
}

impl Replicated {
    /// Makes the next cycle's log and sends it (the agent follows the servers as they fail).
    fn cycle(&mut self, rng: &mut Rng, dir: &Path) -> std::process::Child {
        let k = self.states.len();
        let next = dir.join(format!("{}-c{k}.raw", self.vm));
        let log = dir.join(format!("{}-c{k}.hrl", self.vm));
        self.last_log = next_cycle(
            rng,
            &self.states[k - 1],
            &next,
            &log,
            &self.last_log,
            3,
            256 * 1024,
        );
        self.states.push(next);
        self.logs.push(log);
        let creds = self.creds.clone();
        self.send(&creds)
    }

    /// Sends the last cycle's log again with other credentials.
    fn resend(&self, creds: &Path) -> std::process::Child {
        self.send(creds)
    }

    fn send(&self, creds: &Path) -> std::process::Child {
        let k = self.states.len() - 1;
        let log = &self.logs[k - 1];
        std::process::Command::new(crate::common::BIN)
            .args([
                "agent",
                "replicate",
                "--creds",
                creds.to_str().unwrap(),
                "--vm",
                &self.vm,
                "--disk",
                "os",
                "--hrl",
                log.to_str().unwrap(),
                "--cycle",
                &k.to_string(),
            ])
            .env("DRVAULT_BACKOFF_SCALE", "0.02")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

fn finished(child: std::process::Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    succeeded(&out, what);
}

/// Twelve VMs over three servers; one server is killed (SIGKILL) while its VMs' logs are in
/// flight, another is paused (SIGSTOP) past its lease TTL in the middle of publishing a log and
/// then resumed. The agents finish every cycle through the servers left, the resumed server's
/// publication is refused by the fence (and counted), every point of every VM exports exactly
/// through a server other than the one that took it, and verify finds the vault clean.
fn servers_fail_and_the_agents_finish(mut cluster: Cluster) {
    let backend = cluster.backend.name();
    cluster
        .config
        .push_str(&format!("\n[cluster]\nlease_ttl_s = {TTL_S}\n"));
    let dir = cluster.dir.clone();
    // Server 2 can be told to stall a disk record's write (fault rules in a file it re-reads).
    let faults = dir.join("s2-faults.spec");
    std::fs::write(&faults, "# none yet\n").unwrap();
    cluster.start(2);
    let env = format!("@{}", faults.display());
    cluster.start_server_with(&[("DRVAULT_FAULTS", env.as_str())]);
    let host = cluster.add_host(0, "hv");

    // Initial replication and cycle 1 of each VM through its home server (i % 3).
    let mut rng = Rng(19);
    let mut vms: Vec<Replicated> = (0..VMS)
        .map(|i| {
            let vm = format!("vm{i:02}");
            let c0 = dir.join(format!("{vm}-c0.raw"));
            small_disk(&c0, 4, 1000 + i as u64);
            let creds = creds_via(&cluster, &host, i % SERVERS);
            let disk = format!("{}:os", c0.display());
            let creds_s = creds.to_str().unwrap().to_string();
            succeeded(
                &agent(&["protect", "--creds", &creds_s, "--vm", &vm, "--disk", &disk]),
                &format!("{backend}: protect {vm}"),
            );
            Replicated {
                vm,
                states: vec![c0],
                last_log: ZERO_GUID.to_string(),
                logs: Vec::new(),
                creds,
            }
        })
        .collect();
    let first: Vec<_> = vms.iter_mut().map(|r| r.cycle(&mut rng, &dir)).collect();
    for (c, r) in first.into_iter().zip(&vms) {
        finished(c, &format!("{backend}: cycle 1 of {}", r.vm));
    }
    // Each server holds the VMs whose agents came to it first (as server 0 reads the others'
    // heartbeats: up to TTL/5 behind).
    for s in 0..SERVERS {
        let want: Vec<String> = (0..VMS)
            .filter(|i| i % SERVERS == s)
            .map(|i| format!("vm{i:02}"))
            .collect();
        eventually(
            Duration::from_secs(30),
            &format!("{backend}: leases of server {s}"),
            || {
                let mut held = held_by(&cluster, 0, s);
                held.sort();
                (held == want)
                    .then_some(())
                    .ok_or_else(|| format!("{held:?}"))
            },
        );
    }

    // Server 2 stalls the next disk-record write for 20 s; vm02 (held by server 2) sends its
    // cycle 2 and the server gets as far as that write.
    std::fs::write(
        &faults,
        "op=put_if_absent prefix=records/disk/ kind=latency ms=20000 times=1\n",
    )
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "server 2 takes the fault rules",
        || {
            cluster
                .server(2)
                .log()
                .contains("fault rules replaced")
                .then_some(())
                .ok_or_else(|| "not yet".to_string())
        },
    );
    let stalled = vms[2].cycle(&mut rng, &dir);
    eventually(
        Duration::from_secs(30),
        "server 2 stalls the disk record",
        || {
            cluster
                .metric(2, "drvault_faults_injected_total")
                .filter(|n| *n >= 1.0)
                .ok_or_else(|| "no fault injected yet".to_string())
        },
    );
    // Paused there, past its TTL.
    cluster.pause(2);
    let paused_at = Instant::now();

    // Cycle 2 of server 1's VMs is in flight when server 1 dies.
    let mut inflight = Vec::new();
    for i in (0..VMS).filter(|i| i % SERVERS == 1) {
        inflight.push((i, vms[i].cycle(&mut rng, &dir)));
    }
    cluster.kill(1);
    // Cycle 2 of the other VMs of server 2 (paused: their agents' connections stall and time
    // out, then they go on to the next URL), and of server 0's.
    for i in (0..VMS).filter(|i| i % SERVERS != 1 && *i != 2) {
        inflight.push((i, vms[i].cycle(&mut rng, &dir)));
    }
    // vm02's agent is stuck on the paused server; the host sends the same log again through
    // server 0 (an agent restarted), which takes vm02 over once server 2 looks dead to it.
    let resent = vms[2].resend(&creds_via(&cluster, &host, 0));
    finished(
        resent,
        &format!("{backend}: cycle 2 of vm02 again, through server 0"),
    );
    assert!(held_by(&cluster, 0, 0).contains(&"vm02".to_string()));
    for (i, c) in inflight {
        finished(
            c,
            &format!("{backend}: cycle 2 of vm{i:02} with servers 1 and 2 down"),
        );
    }
    assert!(
        paused_at.elapsed() > Duration::from_secs(TTL_S),
        "server 2 was paused past its TTL"
    );
    // Resumed: its stalled write finds the record fenced by server 0's epoch and is refused.
    cluster.resume(2);
    eventually(
        Duration::from_secs(60),
        "server 2's stalled publication is refused",
        || {
            cluster
                .metric(2, "drvault_fenced_writes_total")
                .filter(|n| *n >= 1.0)
                .ok_or_else(|| "no fenced write yet".to_string())
        },
    );
    finished(
        stalled,
        &format!("{backend}: cycle 2 of vm02 after its server paused"),
    );
    // Server 2 no longer holds vm02, and sends its agents to server 0.
    assert!(!held_by(&cluster, 2, 2).contains(&"vm02".to_string()));

    // Cycle 3 of every VM through whatever servers are left.
    let third: Vec<_> = vms.iter_mut().map(|r| r.cycle(&mut rng, &dir)).collect();
    for (c, r) in third.into_iter().zip(&vms) {
        finished(c, &format!("{backend}: cycle 3 of {}", r.vm));
    }

    // Every point of every VM exports exactly, through a server other than its holder.
    let scratch = dir.join("exports");
    std::fs::create_dir_all(&scratch).unwrap();
    for r in &vms {
        let holder = (0..SERVERS)
            .filter(|&s| s != 1)
            .find(|&s| held_by(&cluster, 0, s).contains(&r.vm))
            .unwrap_or(0);
        let reader = if holder == 0 { 2 } else { 0 };
        for (k, state) in r.states.iter().enumerate().skip(1) {
            cluster
                .server(reader)
                .export_os_equals(&r.vm, &k.to_string(), state, &scratch);
        }
    }
    let o = cluster.server(0).cli(&["verify", "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{backend}: verify after the failures: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn twelve_vms_survive_a_killed_and_a_paused_server_on_a_file_vault() {
    let dir = tempfile::tempdir().unwrap();
    servers_fail_and_the_agents_finish(Cluster::file(dir.path()));
}

#[test]
fn twelve_vms_survive_a_killed_and_a_paused_server_on_azurite() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = Cluster::azurite(dir.path()) else {
        return;
    };
    servers_fail_and_the_agents_finish(cluster);
}

#[test]
fn twelve_vms_survive_a_killed_and_a_paused_server_on_moto() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = Cluster::moto(dir.path()) else {
        return;
    };
    servers_fail_and_the_agents_finish(cluster);
}

/// Garbage collection (grace 0) looping on server 0 while server 1 ingests VMs whose disks share
/// most of their data (deduplicated against each other) and merges their logs: nothing
/// referenced is ever deleted. Every point of every VM exports exactly afterwards, verify is
/// clean, and the collections ran in rounds server 1 joined.
#[test]
fn gc_on_one_server_while_another_ingests_deletes_nothing_referenced() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::file(dir.path());
    cluster.start(2);
    let host = cluster.add_host(0, "hv");
    let creds = creds_via(&cluster, &host, 1);
    let dir = cluster.dir.clone();
    let base = dir.join("base.raw");
    small_disk(&base, 4, 77);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collections = {
        let stop = stop.clone();
        let s0 = cluster.server(0);
        let (data_dir, bin) = (s0.data_dir.clone(), crate::common::BIN);
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let o = std::process::Command::new(bin)
                    .args(["gc", "--json", "--grace", "0", "--data-dir"])
                    .arg(&data_dir)
                    .output()
                    .unwrap();
                let out = String::from_utf8_lossy(&o.stdout).to_string();
                let err = String::from_utf8_lossy(&o.stderr).to_string();
                // Another collection still running is the one refusal expected here.
                assert!(
                    o.status.success() || err.contains("maintenance_running"),
                    "gc failed: {out}{err}"
                );
                n += usize::from(o.status.success());
            }
            n
        })
    };

    let mut rng = Rng(5);
    let mut vms = Vec::new();
    for i in 0..4 {
        let vm = format!("dd{i}");
        // The same disk for every VM, then each one's own changes: most chunks deduplicate.
        let c0 = dir.join(format!("{vm}-c0.raw"));
        std::fs::copy(&base, &c0).unwrap();
        let disk = format!("{}:os", c0.display());
        let creds_s = creds.to_str().unwrap().to_string();
        succeeded(
            &agent(&["protect", "--creds", &creds_s, "--vm", &vm, "--disk", &disk]),
            &format!("protect {vm} while collections run"),
        );
        let mut r = Replicated {
            vm,
            states: vec![c0],
            last_log: ZERO_GUID.to_string(),
            logs: Vec::new(),
            creds: creds.clone(),
        };
        for _ in 0..2 {
            let c = r.cycle(&mut rng, &dir);
            finished(c, &format!("a cycle of {} while collections run", r.vm));
        }
        // Merge the first log into the base map (its superseded chunks become garbage).
        succeeded(
            &cluster
                .server(1)
                .cli(&["merge", "--vm", &r.vm, "--through", "c1"]),
            &format!("merge of {}", r.vm),
        );
        vms.push(r);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ran = collections.join().unwrap();
    assert!(
        ran >= 1,
        "no collection finished while the VMs were ingested"
    );
    // Server 1 took part in the rounds (it acknowledged them in the vault).
    let id1 = std::fs::read_to_string(cluster.server(1).data_dir.join("server.id")).unwrap();
    let ack = cluster
        .dir
        .join("vault/records/scrub")
        .join(format!("gc-ack-{}", id1.trim()));
    assert!(
        ack.exists(),
        "server 1 never acknowledged a collection round"
    );

    let scratch = dir.join("exports");
    std::fs::create_dir_all(&scratch).unwrap();
    for r in &vms {
        for (k, state) in r.states.iter().enumerate().skip(1) {
            cluster
                .server(0)
                .export_os_equals(&r.vm, &k.to_string(), state, &scratch);
        }
    }
    let o = cluster.server(0).cli(&["verify", "--json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "verify after the collections: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
