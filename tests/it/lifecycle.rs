//! Changing what is protected: disable, disks added, removed and grown, hosts of a cluster.
//! Also the smaller fixes found on the way: export without --point, point times from the logs,
//! and the finalize step that checks what it says.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const CONFIG: &str = "[vault]\nblock_size = 1048576\n";
const SIZE: u64 = 8 * MIB;

/// A scratch directory with a server, one registered host and helpers that act as its agent.
struct World {
    _t: tempfile::TempDir,
    dir: PathBuf,
    server: Server,
    creds: PathBuf,
    rng: Rng,
}

impl World {
    fn new(config: &str) -> World {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let server = Server::start(&dir, Some(config));
        let creds = server.add_host("hv", None);
        World {
            _t: t,
            dir,
            server,
            creds,
            rng: Rng(17),
        }
    }

    /// Points the host's credentials at the server again (a restart listens on a new port).
    fn repoint(&self) {
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(&self.creds).unwrap()).unwrap();
        v["server"] = Value::from(self.server.url.clone());
        std::fs::write(&self.creds, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn creds_of(&self, creds: &Path) -> String {
        creds.to_str().unwrap().to_string()
    }

    /// `agent protect` of `vm` with its disks as (image, id), from the host of `creds`.
    fn protect_as(&self, creds: &Path, vm: &str, disks: &[(&Path, &str)]) -> std::process::Output {
        let c = self.creds_of(creds);
        let specs: Vec<String> = disks
            .iter()
            .map(|(p, id)| format!("{}:{id}", p.display()))
            .collect();
        let mut args = vec!["agent", "protect", "--json", "--creds", &c, "--vm", vm];
        for s in &specs {
            args.push("--disk");
            args.push(s);
        }
        self.server.cli(&args)
    }

    fn protect(&self, vm: &str, disks: &[(&Path, &str)]) {
        succeeded(&self.protect_as(&self.creds, vm, disks), "agent protect");
    }

    /// One cycle of a raw disk: `cur` is copied to `next`, changed, and the log between them
    /// written; returns the log's path and id.
    fn cycle(&mut self, cur: &Path, next: &Path, prev_id: &str, name: &str) -> (PathBuf, String) {
        let log = self.path(&format!("{name}.hrl"));
        let id = next_cycle(&mut self.rng, cur, next, &log, prev_id, 12, 64 * KIB);
        (log, id)
    }

    /// `agent replicate` of one log as cycle `cycle`, from the host of `creds`.
    fn replicate_as(
        &self,
        creds: &Path,
        vm: &str,
        disk: &str,
        log: &Path,
        cycle: u64,
    ) -> std::process::Output {
        let c = self.creds_of(creds);
        let n = cycle.to_string();
        self.server.cli(&[
            "agent",
            "replicate",
            "--creds",
            &c,
            "--vm",
            vm,
            "--disk",
            disk,
            "--hrl",
            log.to_str().unwrap(),
            "--cycle",
            &n,
        ])
    }

    fn replicate(&self, vm: &str, disk: &str, log: &Path, cycle: u64) {
        succeeded(
            &self.replicate_as(&self.creds, vm, disk, log, cycle),
            "agent replicate",
        );
    }

    /// The disk exported as raw (at `point`, or without --point).
    fn export(&self, vm: &str, disk: &str, point: Option<&str>) -> Vec<u8> {
        let out = self.path("export.raw");
        let o = out.to_str().unwrap().to_string();
        let mut args = vec![
            "export", "--vm", vm, "--disk", disk, "--format", "raw", "-o", &o,
        ];
        if let Some(p) = point {
            args.push("--point");
            args.push(p);
        }
        self.server.cli_ok(&args);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    fn points(&self, vm: &str) -> Vec<Value> {
        serde_json::from_str(&self.server.cli_ok(&["points", "--vm", vm, "--json"])).unwrap()
    }

    fn point_ids(&self, vm: &str) -> Vec<String> {
        self.points(vm)
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// A raw disk image of `size` bytes with some data.
fn image(path: &Path, size: u64, seed: u64) {
    raw_image(
        path,
        size,
        &[(0, MIB as usize), (size / 2, 512 * KIB as usize)],
        seed,
    );
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A refused CLI call whose error names `code`.
fn refused_with(o: &std::process::Output, code: &str) {
    assert!(
        !o.status.success() && stderr(o).contains(code),
        "expected a refusal with {code}; status {:?}, stderr: {}",
        o.status,
        stderr(o)
    );
}

#[test]
fn export_without_point_is_the_latest_point_after_a_log() {
    let mut w = World::new(CONFIG);
    let (c0, c1) = (w.path("c0.raw"), w.path("c1.raw"));
    image(&c0, SIZE, 1);
    let src = w.path("src.raw");
    std::fs::copy(&c0, &src).unwrap();
    w.protect("vm", &[(&src, "d")]);
    let (log, _) = w.cycle(&c0, &c1, ZERO_GUID, "c1");
    w.replicate("vm", "d", &log, 1);
    let want = std::fs::read(&c1).unwrap();
    assert!(
        w.export("vm", "d", None) == want,
        "export without --point is the disk at the latest point (c1), not the base (c0)"
    );
    assert!(w.export("vm", "d", Some("latest")) == want);
    assert!(w.export("vm", "d", Some("c0")) == std::fs::read(&c0).unwrap());
    // The map names the point it resolved to, so its blocks are read at that point.
    let map: Value = serde_json::from_str(
        &serde_json::to_string(
            &tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(w.server.operator().map("vm", "d", None))
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(map["point"], "c1");
}

#[test]
fn point_time_is_the_logs_own_with_the_accept_time_next_to_it() {
    let w = World::new(CONFIG);
    let src = w.path("src.raw");
    image(&src, SIZE, 2);
    w.protect("vm", &[(&src, "d")]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // `make_log` stamps its logs 800 000 000 s after the HRL epoch (2000-01-01).
    let id = drvault::format::hrl::Guid([7; 16]);
    let log = make_log(
        &[(MIB, vec![9u8; 4096])],
        id,
        drvault::format::hrl::Guid([0; 16]),
    );
    let host = w.server.client_with(&Server::host_token(&w.creds));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ack = rt
        .block_on(send_log(&host, "vm", "d", &log, id, Some(1)))
        .unwrap();
    assert_eq!(ack["status"], "accepted");
    let pts = w.points("vm");
    let c1 = pts.iter().find(|p| p["id"] == "c1").unwrap();
    let log_time = 946_684_800u64 + 800_000_000;
    assert_eq!(c1["time_unix"].as_u64(), Some(log_time), "{c1}");
    assert_eq!(c1["time"], "2025-05-08T06:13:20Z", "{c1}");
    let accepted = c1["accepted_unix"].as_u64().unwrap();
    assert!(
        accepted >= before,
        "accept time {accepted} is the server's, not the log's"
    );
    assert!(!c1["accepted"].as_str().unwrap().is_empty());
    // The listing shows both.
    let listed = w.server.cli_ok(&["points", "--vm", "vm"]);
    assert!(
        listed.contains("ACCEPTED") && listed.contains("2025-05-08T06:13:20Z"),
        "{listed}"
    );
    // A time selector chooses by the point's time.
    assert!(w.export("vm", "d", Some("2025-05-08T06:13:20Z")) == w.export("vm", "d", Some("c1")));
}

#[test]
fn finalize_step_reports_network_mappings_and_policy() {
    let w = World::new(CONFIG);
    let src = w.path("src.raw");
    image(&src, SIZE, 3);
    let c = w.creds_of(&w.creds);
    w.server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        &c,
        "--vm",
        "vm",
        "--disk",
        &format!("{}:d", src.display()),
        "--nic",
        "network=corp,mac=00:15:5d:01:02:03",
    ]);
    let jobs: Vec<Value> =
        serde_json::from_str(&w.server.cli_ok(&["jobs", "--vm", "vm", "--json"])).unwrap();
    let fin = jobs
        .iter()
        .find(|j| j["kind"] == "finalize_protection")
        .unwrap_or_else(|| panic!("{jobs:?}"));
    let step = &fin["steps"][0];
    assert_eq!(step["name"], "Check network mappings and policy", "{fin}");
    let detail = step["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("warning") && detail.contains("corp") && detail.contains("policy valid"),
        "the step says what it found: {detail}"
    );
    let shown = w.server.cli_ok(&["jobs", fin["id"].as_str().unwrap()]);
    assert!(shown.contains("no network mapping"), "{shown}");
}

#[test]
fn a_disabled_vm_keeps_its_points_refuses_uploads_and_expires_after_retention() {
    // Background work every second, so the expiry of the disabled VM is seen quickly.
    let mut w = World::new(&format!("{CONFIG}\n[replica]\nmerge_interval_s = 1\n"));
    let (c0, c1, c2) = (w.path("c0.raw"), w.path("c1.raw"), w.path("c2.raw"));
    image(&c0, SIZE, 4);
    w.protect("vm", &[(&c0, "d")]);
    let (log1, id1) = w.cycle(&c0, &c1, ZERO_GUID, "c1");
    w.replicate("vm", "d", &log1, 1);
    let (log2, _) = w.cycle(&c1, &c2, &id1, "c2");

    let out = w.server.cli_ok(&["vm", "disable", "--vm", "vm"]);
    assert!(out.contains("points stay readable until"), "{out}");
    let jobs: Vec<Value> =
        serde_json::from_str(&w.server.cli_ok(&["jobs", "--vm", "vm", "--json"])).unwrap();
    let job = jobs
        .iter()
        .find(|j| j["kind"] == "disable_protection")
        .unwrap_or_else(|| panic!("{jobs:?}"));
    assert_eq!(job["state"], "succeeded", "{job}");
    let vm: Value = serde_json::from_str(&w.server.cli_ok(&["vms", "vm", "--json"])).unwrap();
    let vm = if vm.is_array() { vm[0].clone() } else { vm };
    assert_eq!(vm["state"], "disabled", "{vm}");

    // The points still read as they were.
    assert_eq!(w.point_ids("vm"), ["c0", "c1"]);
    assert!(w.export("vm", "d", Some("c0")) == std::fs::read(&c0).unwrap());
    assert!(w.export("vm", "d", Some("c1")) == std::fs::read(&c1).unwrap());
    // Uploads are refused with a clear code, and nothing changes.
    refused_with(
        &w.replicate_as(&w.creds, "vm", "d", &log2, 2),
        "vm_disabled",
    );
    refused_with(&w.protect_as(&w.creds, "vm", &[(&c0, "d")]), "vm_disabled");
    assert_eq!(w.point_ids("vm"), ["c0", "c1"]);
    // A failover of it too.
    refused_with(
        &w.server.cli(&["failover", "--vm", "vm", "--kind", "test"]),
        "vm_disabled",
    );

    // Once the retention window has passed since the disable, the background work removes it.
    w.server
        .cli_ok(&["vm", "set", "vm", "--interval", "30s", "--retention", "30s"]);
    eventually(Duration::from_secs(120), "the disabled VM expires", || {
        let o = w.server.cli(&["points", "--vm", "vm", "--json"]);
        if !o.status.success() && stderr(&o).contains("vm_not_found") {
            Ok(())
        } else {
            Err(format!("{:?} {}", o.status, stderr(&o)))
        }
    });
    // Its name can be protected again afresh.
    w.protect("vm", &[(&c2, "d")]);
    assert_eq!(w.point_ids("vm"), ["c0"]);
    assert!(w.export("vm", "d", None) == std::fs::read(&c2).unwrap());
}

#[test]
fn disable_with_delete_data_lets_gc_free_the_objects() {
    let mut w = World::new(CONFIG);
    let (c0, c1) = (w.path("c0.raw"), w.path("c1.raw"));
    image(&c0, SIZE, 5);
    w.protect("vm", &[(&c0, "d")]);
    let (log1, _) = w.cycle(&c0, &c1, ZERO_GUID, "c1");
    w.replicate("vm", "d", &log1, 1);
    // A second VM whose objects must survive.
    let other = w.path("other.raw");
    image(&other, SIZE, 6);
    w.protect("keep", &[(&other, "d")]);
    let gc = |w: &World| -> Value {
        serde_json::from_str(&w.server.cli_ok(&["gc", "--json", "--grace", "0"])).unwrap()
    };
    gc(&w);
    let chunks_before = w.server.vault_objects("chunks").len();
    assert!(!w.server.vault_objects("logs").is_empty());

    let out = w
        .server
        .cli_ok(&["vm", "disable", "--vm", "vm", "--delete-data"]);
    assert!(out.contains("records removed"), "{out}");
    refused_with(&w.server.cli(&["points", "--vm", "vm"]), "vm_not_found");
    let r = gc(&w);
    assert!(
        r["freed_total"]["objects"].as_u64().unwrap() > 0,
        "gc frees the disabled VM's objects: {r}"
    );
    assert!(
        w.server.vault_objects("logs").is_empty(),
        "its logs are gone: {:?}",
        w.server.vault_objects("logs")
    );
    assert!(w.server.vault_objects("chunks").len() < chunks_before);
    // The other VM still reads; a restart does not bring the deleted VM back.
    assert!(w.export("keep", "d", None) == std::fs::read(&other).unwrap());
    w.server.kill();
    w.server.restart();
    w.repoint();
    refused_with(&w.server.cli(&["points", "--vm", "vm"]), "vm_not_found");
    assert!(w.export("keep", "d", None) == std::fs::read(&other).unwrap());
    // The name is free again.
    w.protect("vm", &[(&c1, "d")]);
    assert!(w.export("vm", "d", None) == std::fs::read(&c1).unwrap());
}

#[test]
fn disable_is_refused_for_an_unknown_vm_and_while_a_drill_is_up() {
    let w = World::new(CONFIG);
    let src = w.path("src.raw");
    image(&src, SIZE, 7);
    w.protect("vm", &[(&src, "d")]);
    refused_with(
        &w.server.cli(&["vm", "disable", "--vm", "nope"]),
        "vm_not_found",
    );
    w.server
        .cli_ok(&["failover", "--vm", "vm", "--kind", "test"]);
    for args in [
        vec!["vm", "disable", "--vm", "vm"],
        vec!["vm", "disable", "--vm", "vm", "--delete-data"],
    ] {
        refused_with(&w.server.cli(&args), "drill_not_cleaned_up");
    }
    // Nothing changed: still protected, no disable job, the points read.
    let vm: Value = serde_json::from_str(&w.server.cli_ok(&["vms", "vm", "--json"])).unwrap();
    let vm = if vm.is_array() { vm[0].clone() } else { vm };
    assert_eq!(vm["state"], "protected");
    let jobs: Vec<Value> =
        serde_json::from_str(&w.server.cli_ok(&["jobs", "--vm", "vm", "--json"])).unwrap();
    assert!(
        !jobs.iter().any(|j| j["kind"] == "disable_protection"),
        "{jobs:?}"
    );
    assert!(w.export("vm", "d", None) == std::fs::read(&src).unwrap());
    w.server.cli_ok(&["failover", "cleanup", "--vm", "vm"]);
    w.server.cli_ok(&["vm", "disable", "--vm", "vm"]);
}

#[test]
fn hosts_of_a_cluster_continue_one_chain_and_others_are_refused() {
    let mut w = World::new(CONFIG);
    let add = |name: &str, cluster: Option<&str>| {
        let out = w.path(&format!("{name}.creds.json"));
        let o = out.to_str().unwrap().to_string();
        let mut args = vec!["host", "add", name, "-o", &o];
        if let Some(c) = cluster {
            args.push("--cluster");
            args.push(c);
        }
        w.server.cli_ok(&args);
        out
    };
    let node1 = add("node1", Some("hvc"));
    let node2 = add("node2", Some("hvc"));
    let lone = w.creds.clone();
    let elsewhere = add("node9", Some("other"));
    let hosts: Vec<Value> =
        serde_json::from_str(&w.server.cli_ok(&["host", "list", "--json"])).unwrap();
    assert!(hosts
        .iter()
        .any(|h| h["name"] == "node2" && h["cluster"] == "hvc"));

    let (c0, c1, c2, c3) = (
        w.path("c0.raw"),
        w.path("c1.raw"),
        w.path("c2.raw"),
        w.path("c3.raw"),
    );
    image(&c0, SIZE, 8);
    succeeded(
        &w.protect_as(&node1, "vm", &[(&c0, "d")]),
        "protect on node1",
    );
    let (log1, id1) = w.cycle(&c0, &c1, ZERO_GUID, "c1");
    succeeded(
        &w.replicate_as(&node1, "vm", "d", &log1, 1),
        "c1 from node1",
    );
    // The VM moves to node2: its agent declares it again and continues the chain.
    succeeded(
        &w.protect_as(&node2, "vm", &[(&c1, "d")]),
        "protect on node2",
    );
    let (log2, id2) = w.cycle(&c1, &c2, &id1, "c2");
    succeeded(
        &w.replicate_as(&node2, "vm", "d", &log2, 2),
        "c2 from node2",
    );
    // Hosts outside the cluster are refused, and nothing changes.
    let (log3, _) = w.cycle(&c2, &c3, &id2, "c3");
    for creds in [&lone, &elsewhere] {
        refused_with(&w.replicate_as(creds, "vm", "d", &log3, 3), "forbidden");
        refused_with(&w.protect_as(creds, "vm", &[(&c2, "d")]), "forbidden");
    }
    assert_eq!(w.point_ids("vm"), ["c0", "c1", "c2"]);
    // Back on node1 the same chain goes on: no resync was needed anywhere.
    succeeded(
        &w.replicate_as(&node1, "vm", "d", &log3, 3),
        "c3 from node1",
    );
    let vm: Value = serde_json::from_str(&w.server.cli_ok(&["vms", "vm", "--json"])).unwrap();
    let vm = if vm.is_array() { vm[0].clone() } else { vm };
    assert!(vm["disks"][0]["resync_required"].is_null(), "{vm}");
    for (p, img) in [("c0", &c0), ("c1", &c1), ("c2", &c2), ("c3", &c3)] {
        assert!(
            w.export("vm", "d", Some(p)) == std::fs::read(img).unwrap(),
            "{p} exports as the disk was"
        );
    }

    // An invalid cluster name: a clear error, no host registered.
    let o = w
        .server
        .cli(&["host", "add", "node3", "--cluster", "bad/name"]);
    refused_with(&o, "invalid_name");
    assert!(stderr(&o).contains("cluster"), "{}", stderr(&o));
    let hosts: Vec<Value> =
        serde_json::from_str(&w.server.cli_ok(&["host", "list", "--json"])).unwrap();
    assert!(!hosts.iter().any(|h| h["name"] == "node3"), "{hosts:?}");
}

/// `hrl diff` of two states of a disk into `log`, chained to `prev_id`; returns the log's id.
fn diff(w: &mut World, old: &Path, new: &Path, prev_id: &str, name: &str) -> (PathBuf, String) {
    let log = w.path(&format!("{name}.hrl"));
    let id = w.rng.guid();
    w.server.cli_ok(&[
        "hrl",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
        "-o",
        log.to_str().unwrap(),
        "--previous-id",
        prev_id,
        "--unique-id",
        &id,
    ]);
    (log, id)
}

fn point_disks(w: &World, vm: &str) -> Vec<(String, Vec<String>)> {
    w.points(vm)
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["disks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn export_refused(w: &World, vm: &str, disk: &str, point: &str, code: &str) {
    let out = w.path("refused.raw");
    let o = w.server.export(vm, disk, point, "raw", &out);
    refused_with(&o, code);
}

#[test]
fn an_added_disk_replicates_alone_and_joins_the_points_after_it() {
    let mut w = World::new(CONFIG);
    let os: Vec<PathBuf> = (0..4).map(|i| w.path(&format!("os{i}.raw"))).collect();
    let data: Vec<PathBuf> = (0..2).map(|i| w.path(&format!("data{i}.raw"))).collect();
    image(&os[0], SIZE, 10);
    w.protect("vm", &[(&os[0], "os")]);
    let (l1, id1) = w.cycle(&os[0], &os[1], ZERO_GUID, "os1");
    w.replicate("vm", "os", &l1, 1);

    // The host declares the VM again with a new disk: only that disk is replicated.
    image(&data[0], 4 * MIB, 11);
    let out = succeeded(
        &w.protect_as(&w.creds, "vm", &[(&os[1], "os"), (&data[0], "data")]),
        "agent protect with a new disk",
    );
    let summary: Value = serde_json::from_str(&out).unwrap();
    let sent = |id: &str| {
        summary["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap()["uploaded_blocks"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        sent("os"),
        0,
        "the protected disk is not sent again: {summary}"
    );
    assert!(sent("data") > 0, "{summary}");
    let vm: Value = serde_json::from_str(&w.server.cli_ok(&["vms", "vm", "--json"])).unwrap();
    assert_eq!(vm["disks"].as_array().unwrap().len(), 2, "{vm}");
    assert_eq!(vm["state"], "protected");
    // Earlier points do not include it; the next cycle waits for the first disk's log.
    let listed = w.points("vm");
    assert_eq!(
        point_disks(&w, "vm")[..2],
        [
            ("c0".into(), vec!["os".to_string()]),
            ("c1".into(), vec!["os".to_string()])
        ]
    );
    assert_eq!(listed[2]["id"], "c2", "{listed:?}");
    assert_eq!(listed[2]["kind"], "incomplete", "{listed:?}");
    assert_eq!(
        listed[2]["waiting_for"],
        serde_json::json!(["os"]),
        "{listed:?}"
    );

    let (l2, id2) = w.cycle(&os[1], &os[2], &id1, "os2");
    w.replicate("vm", "os", &l2, 2);
    // Its first log follows its initial replication (which stands for c2).
    let (ld, _) = w.cycle(&data[0], &data[1], ZERO_GUID, "data1");
    w.replicate("vm", "data", &ld, 3);
    let (l3, _) = w.cycle(&os[2], &os[3], &id2, "os3");
    w.replicate("vm", "os", &l3, 3);

    let both = vec!["os".to_string(), "data".to_string()];
    assert_eq!(
        point_disks(&w, "vm"),
        [
            ("c0".into(), vec!["os".to_string()]),
            ("c1".into(), vec!["os".to_string()]),
            ("c2".into(), both.clone()),
            ("c3".into(), both),
        ]
    );
    // Every point exports as the model: earlier ones without the disk.
    for (i, p) in ["c0", "c1", "c2", "c3"].iter().enumerate() {
        assert!(
            w.export("vm", "os", Some(p)) == std::fs::read(&os[i]).unwrap(),
            "os at {p}"
        );
    }
    assert!(w.export("vm", "data", Some("c2")) == std::fs::read(&data[0]).unwrap());
    assert!(w.export("vm", "data", Some("c3")) == std::fs::read(&data[1]).unwrap());
    assert!(w.export("vm", "data", None) == std::fs::read(&data[1]).unwrap());
    for p in ["c0", "c1"] {
        export_refused(&w, "vm", "data", p, "disk_not_in_point");
    }
}

#[test]
fn a_removed_disk_stays_in_the_points_before_its_removal() {
    let mut w = World::new(CONFIG);
    let os: Vec<PathBuf> = (0..3).map(|i| w.path(&format!("os{i}.raw"))).collect();
    let data: Vec<PathBuf> = (0..3).map(|i| w.path(&format!("data{i}.raw"))).collect();
    image(&os[0], SIZE, 20);
    image(&data[0], 4 * MIB, 21);
    w.protect("vm", &[(&os[0], "os"), (&data[0], "data")]);
    let (lo1, ido1) = w.cycle(&os[0], &os[1], ZERO_GUID, "os1");
    let (ld1, idd1) = w.cycle(&data[0], &data[1], ZERO_GUID, "data1");
    w.replicate("vm", "os", &lo1, 1);
    w.replicate("vm", "data", &ld1, 1);

    // Declared again without the data disk: it is removed.
    w.protect("vm", &[(&os[1], "os")]);
    let (ld2, _) = w.cycle(&data[1], &data[2], &idd1, "data2");
    refused_with(
        &w.replicate_as(&w.creds, "vm", "data", &ld2, 2),
        "disk_removed",
    );
    let (lo2, _) = w.cycle(&os[1], &os[2], &ido1, "os2");
    w.replicate("vm", "os", &lo2, 2);

    let both = vec!["os".to_string(), "data".to_string()];
    assert_eq!(
        point_disks(&w, "vm"),
        [
            ("c0".into(), both.clone()),
            ("c1".into(), both),
            ("c2".into(), vec!["os".to_string()]),
        ]
    );
    for (i, p) in ["c0", "c1", "c2"].iter().enumerate() {
        assert!(
            w.export("vm", "os", Some(p)) == std::fs::read(&os[i]).unwrap(),
            "os at {p}"
        );
    }
    for (i, p) in ["c0", "c1"].iter().enumerate() {
        assert!(
            w.export("vm", "data", Some(p)) == std::fs::read(&data[i]).unwrap(),
            "data at {p}"
        );
    }
    export_refused(&w, "vm", "data", "c2", "disk_not_in_point");
    export_refused(&w, "vm", "data", "latest", "disk_not_in_point");
    let vm: Value = serde_json::from_str(&w.server.cli_ok(&["vms", "vm", "--json"])).unwrap();
    assert_eq!(vm["disks"].as_array().unwrap().len(), 1, "{vm}");

    // Its id cannot come back while points read it: a clear error, nothing changed.
    refused_with(
        &w.protect_as(&w.creds, "vm", &[(&os[2], "os"), (&data[2], "data")]),
        "disk_id_retained",
    );
    assert_eq!(w.point_ids("vm"), ["c0", "c1", "c2"]);
    // A restart keeps all of it.
    w.server.kill();
    w.server.restart();
    assert!(w.export("vm", "data", Some("c1")) == std::fs::read(&data[1]).unwrap());
    export_refused(&w, "vm", "data", "c2", "disk_not_in_point");
}

#[test]
fn a_grown_disk_replicates_its_new_range_and_older_points_keep_the_old_size() {
    let mut w = World::new(CONFIG);
    // 4.5 MiB: the last 1 MiB block is short, and grows with the disk.
    let small = 4 * MIB + 512 * KIB;
    let big = 7 * MIB;
    let os: Vec<PathBuf> = (0..5).map(|i| w.path(&format!("os{i}.raw"))).collect();
    image(&os[0], small, 30);
    w.protect("vm", &[(&os[0], "os")]);
    let (l1, id1) = w.cycle(&os[0], &os[1], ZERO_GUID, "os1");
    w.replicate("vm", "os", &l1, 1);

    // The source grows: the new range is zeros until written.
    let grown = w.path("grown.raw");
    std::fs::copy(&os[1], &grown).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&grown)
        .unwrap()
        .set_len(big)
        .unwrap();
    w.protect("vm", &[(&grown, "os")]);
    let vm: Value = serde_json::from_str(&w.server.cli_ok(&["vms", "vm", "--json"])).unwrap();
    assert_eq!(vm["disks"][0]["size"], big, "{vm}");
    // Writes in the new range, in the old short block's new part, and before.
    std::fs::copy(&grown, &os[2]).unwrap();
    write_at(
        &os[2],
        6 * MIB + 4096,
        &pseudo_random(64 * KIB as usize, 31),
    );
    write_at(&os[2], small + 8192, &pseudo_random(16 * KIB as usize, 32));
    write_at(&os[2], MIB, &pseudo_random(4096, 33));
    let (l2, id2) = diff(&mut w, &grown, &os[2], &id1, "os2");
    w.replicate("vm", "os", &l2, 2);

    let sizes = |w: &World| -> Vec<(String, usize)> {
        ["c0", "c1", "c2"]
            .iter()
            .filter(|p| w.point_ids("vm").iter().any(|x| x == *p))
            .map(|p| (p.to_string(), w.export("vm", "os", Some(p)).len()))
            .collect()
    };
    assert_eq!(
        sizes(&w),
        [
            ("c0".into(), small as usize),
            ("c1".into(), small as usize),
            ("c2".into(), big as usize)
        ]
    );
    for (i, p) in ["c0", "c1", "c2"].iter().enumerate() {
        assert!(
            w.export("vm", "os", Some(p)) == std::fs::read(&os[i]).unwrap(),
            "os at {p}"
        );
    }
    // A fixed VHD of the new point has the new size.
    let vhd = w.path("os.vhd");
    succeeded(
        &w.server.export("vm", "os", "c2", "vhd", &vhd),
        "vhd export",
    );
    assert_eq!(qemu_virtual_size(&vhd, "vpc"), big);
    assert!(qemu_identical(&vhd, "vpc", &os[2], "raw"));

    // Merged into the replica, the grown point reads the same, and logs go on.
    w.server.cli_ok(&["merge", "--vm", "vm", "--all"]);
    assert_eq!(w.point_ids("vm"), ["c2"]);
    assert!(w.export("vm", "os", Some("c2")) == std::fs::read(&os[2]).unwrap());
    std::fs::copy(&os[2], &os[3]).unwrap();
    write_at(&os[3], big - 4096, &pseudo_random(4096, 34));
    let (l3, _) = diff(&mut w, &os[2], &os[3], &id2, "os3");
    w.replicate("vm", "os", &l3, 3);
    assert!(w.export("vm", "os", None) == std::fs::read(&os[3]).unwrap());

    // Shrinking is refused with a clear error, and nothing changes.
    image(&os[4], 2 * MIB, 35);
    let o = w.protect_as(&w.creds, "vm", &[(&os[4], "os")]);
    refused_with(&o, "disk_shrink");
    let vm: Value = serde_json::from_str(&w.server.cli_ok(&["vms", "vm", "--json"])).unwrap();
    assert_eq!(vm["disks"][0]["size"], big, "{vm}");
    assert_eq!(w.point_ids("vm"), ["c2", "c3"]);
    assert!(w.export("vm", "os", None) == std::fs::read(&os[3]).unwrap());
}
