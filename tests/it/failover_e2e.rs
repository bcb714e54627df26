//! Failover end to end: a disk that really boots is protected, changed by an MS-HRL log, failed
//! over (test, then unplanned to the earlier point), and qemu boots each materialized VHD and
//! prints the file from its own filesystem. Plus planned failover, addresses and refusals.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// 1 MiB blocks and the shared test networks (fixtures/networks.toml).
const NETWORKS: &str = concat!(
    "[vault]\nblock_size = 1048576\n\n",
    include_str!("../../fixtures/networks.toml")
);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/boot-disk")
        .join(name)
}

fn boot(vhd: &Path) -> String {
    let o = std::process::Command::new("bash")
        .arg(fixture("boot.sh"))
        .arg(vhd)
        .arg("vpc")
        .arg("180")
        .output()
        .expect("boot.sh");
    assert!(
        o.status.success(),
        "the VM did not boot and print its marker:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn definition_dir(server: &Server, vm: &str) -> (Value, PathBuf) {
    let v: Value =
        serde_json::from_str(&server.cli_ok(&["failover", "show", "--vm", vm, "--json"])).unwrap();
    let dir = PathBuf::from(v["record"]["output_dir"].as_str().unwrap());
    (v, dir)
}

#[test]
fn failover_boots_the_changed_disk_then_the_earlier_point() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some(NETWORKS));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let img = dir.join("boot.raw");
    std::fs::write(dir.join("m1.txt"), "hello from drvault, first state\n").unwrap();
    let o = std::process::Command::new("bash")
        .arg(fixture("make-boot-disk.sh"))
        .arg(&img)
        .arg(dir.join("m1.txt"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "make-boot-disk.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        c,
        "--vm",
        "app01",
        "--disk",
        &format!("{}:os", img.display()),
        "--generation",
        "1",
        "--cpus",
        "1",
        "--memory-mib",
        "256",
        "--nic",
        "network=corp,mac=00:15:5d:00:00:07,ip=10.20.1.50",
    ]);

    // The file changes on the source: one MS-HRL log carries it.
    let img2 = dir.join("boot2.raw");
    std::fs::copy(&img, &img2).unwrap();
    std::fs::write(dir.join("m2.txt"), "changed by an MS-HRL log\n").unwrap();
    run(
        "bash",
        &[
            fixture("set-marker.sh").to_str().unwrap(),
            img2.to_str().unwrap(),
            dir.join("m2.txt").to_str().unwrap(),
        ],
    );
    let log = dir.join("c1.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        img.to_str().unwrap(),
        img2.to_str().unwrap(),
        "-o",
        log.to_str().unwrap(),
    ]);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "app01",
        "--disk",
        "os",
        "--hrl",
        log.to_str().unwrap(),
        "--cycle",
        "1",
    ]);

    // Test failover at the latest point: boots and shows the changed file.
    server.cli_ok(&["failover", "--vm", "app01", "--kind", "test"]);
    let (v, drill) = definition_dir(&server, "app01");
    assert!(
        drill.to_str().unwrap().contains("drills"),
        "drills go to their own folder"
    );
    assert_eq!(v["record"]["point"], "c1");
    let vhd = drill.join("os.vhd");
    assert!(boot(&vhd).contains("changed by an MS-HRL log"));
    let nic = &v["definition"]["nics"][0];
    assert_eq!(
        nic["network"], "drill-vnet",
        "test failovers use the test network"
    );
    assert_eq!(v["definition"]["firmware"], "bios");
    for f in std::fs::read_dir(&drill).unwrap().flatten() {
        let p = f.path();
        if p.extension().map(|e| e == "xml").unwrap_or(false) {
            run("virt-xml-validate", &[p.to_str().unwrap()]);
        }
    }
    // The VM keeps replicating during the drill; a second drill waits for cleanup.
    assert!(String::from_utf8_lossy(
        &server
            .cli(&["failover", "--vm", "app01", "--kind", "test"])
            .stderr
    )
    .contains("drill_not_cleaned_up"));
    let out = server.cli_ok(&["failover", "cleanup", "--vm", "app01"]);
    assert!(out.contains("drill successful: true"), "{out}");
    assert!(!drill.exists(), "cleanup removes what the drill created");

    // Unplanned failover to the earlier point: the first file.
    server.cli_ok(&[
        "failover",
        "--vm",
        "app01",
        "--kind",
        "unplanned",
        "--point",
        "c0",
    ]);
    let (v, out_dir) = definition_dir(&server, "app01");
    let nic = &v["definition"]["nics"][0];
    assert_eq!(nic["network"], "recovery-vnet");
    assert_eq!(
        nic["ip"], "10.20.1.50",
        "the source address fits the target subnet and is kept"
    );
    assert_eq!(nic["rule"], "kept_source");
    let vhd = out_dir.join("os.vhd");
    assert_eq!(
        qemu_virtual_size(&vhd, "vpc") % (1024 * 1024),
        0,
        "whole MiB"
    );
    assert!(boot(&vhd).contains("hello from drvault, first state"));
    run(
        "virt-xml-validate",
        &[out_dir.join("domain.xml").to_str().unwrap()],
    );
    assert!(out_dir.join("qemu.sh").exists());

    // Commit: the source's later logs are refused, not recoverable.
    server.cli_ok(&["failover", "commit", "--vm", "app01"]);
    let o = server.cli(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "app01",
        "--disk",
        "os",
        "--hrl",
        log.to_str().unwrap(),
        "--cycle",
        "2",
    ]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "non-recoverable exit code: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("failed_over"));
    let jobs: Value =
        serde_json::from_str(&server.cli_ok(&["jobs", "--vm", "app01", "--json"])).unwrap();
    let kinds: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    for k in [
        "test_failover",
        "failover_cleanup",
        "unplanned_failover",
        "failover_commit",
    ] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
}

#[test]
fn planned_failover_waits_for_final_logs_and_addresses_never_collide() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some(NETWORKS));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let img = dir.join("d.raw");
    raw_image(&img, 3 * 1024 * 1024 + 512, &[(0, 100_000)], 4);
    // Three VMs claim the same source address; a fourth is on an unmapped network.
    for (i, vm) in ["a", "b", "c"].iter().enumerate() {
        server.cli_ok(&[
            "agent",
            "protect",
            "--creds",
            c,
            "--vm",
            vm,
            "--disk",
            &format!("{}:d", img.display()),
            "--nic",
            &format!("network=corp,mac=00:15:5d:00:01:0{i},ip=10.20.1.50"),
        ]);
    }
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        c,
        "--vm",
        "lost",
        "--generation",
        "1",
        "--disk",
        &format!("{}:d", img.display()),
        "--nic",
        "network=elsewhere,mac=00:15:5d:00:02:01",
    ]);
    let o = server.cli(&["failover", "--vm", "lost", "--kind", "unplanned"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("network_unmapped"));
    // A per-NIC override kept with the VM: a bad target or NIC index is refused and changes
    // nothing; a configured target subnet plus a public address makes the failover work.
    let o = server.cli(&["vm", "nic", "lost", "0", "--target", "recovery-vnet/nope"]);
    assert!(
        o.status.success(),
        "the override is stored; the target is checked at failover"
    );
    let o = server.cli(&["failover", "--vm", "lost", "--kind", "unplanned"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown_target_subnet"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = server.cli(&["vm", "nic", "lost", "3", "--skip"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("nic_not_found"));
    server.cli_ok(&[
        "vm",
        "nic",
        "lost",
        "0",
        "--target",
        "recovery-vnet/app",
        "--public",
    ]);
    server.cli_ok(&["failover", "--vm", "lost", "--kind", "unplanned"]);
    let (v, out) = definition_dir(&server, "lost");
    let nic = &v["definition"]["nics"][0];
    assert_eq!(nic["network"], "recovery-vnet", "{v}");
    assert_eq!(nic["public_ip"], true, "{v}");
    let ip: std::net::Ipv4Addr = nic["ip"].as_str().unwrap().parse().unwrap();
    let port = 20000 + (u32::from(ip) & 0x7fff);
    let qemu = std::fs::read_to_string(out.join("qemu.sh"))
        .unwrap_or_else(|e| panic!("qemu.sh: {e}\n{}", server.log()));
    assert!(
        qemu.contains(&format!("hostfwd=tcp:0.0.0.0:{port}-{ip}:22")),
        "{qemu}"
    );
    let o = server.cli(&[
        "failover",
        "--vm",
        "a",
        "--kind",
        "unplanned",
        "--point",
        "c42",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("point_not_found"));
    assert!(String::from_utf8_lossy(
        &server
            .cli(&["failover", "--vm", "nope", "--kind", "test"])
            .stderr
    )
    .contains("vm_not_found"));

    // Planned failover of "a": waits until the final log is in.
    let start = server.cli_ok(&["failover", "--vm", "a", "--kind", "planned", "--no-wait"]);
    let job = start.split_whitespace().last().unwrap().to_string();
    server.wait_job(&job, "waiting_for_input");
    let img2 = dir.join("d2.raw");
    std::fs::copy(&img, &img2).unwrap();
    {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img2)
            .unwrap()
            .write_all_at(&[0x5a; 8192], 1024 * 1024)
            .unwrap();
    }
    let log = dir.join("final.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        img.to_str().unwrap(),
        img2.to_str().unwrap(),
        "-o",
        log.to_str().unwrap(),
    ]);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "a",
        "--disk",
        "d",
        "--hrl",
        log.to_str().unwrap(),
        "--final",
    ]);
    server.wait_job(&job, "succeeded");
    let (v, out) = definition_dir(&server, "a");
    assert_eq!(
        v["record"]["point"], "c1",
        "failed over to the final point: no data loss"
    );
    assert!(
        qemu_identical(&out.join("d.vhd"), "vpc", &img2, "raw") || {
            // The VHD is padded to whole MiB: compare the original bytes.
            let raw = dir.join("a.raw");
            run(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "vpc",
                    "-O",
                    "raw",
                    out.join("d.vhd").to_str().unwrap(),
                    raw.to_str().unwrap(),
                ],
            );
            std::fs::read(&raw).unwrap()[..std::fs::metadata(&img2).unwrap().len() as usize]
                == std::fs::read(&img2).unwrap()[..]
        }
    );
    assert_eq!(v["definition"]["disks"][0]["padded_to_mib"], true);

    // b and c fail over at the same time: same source IP, never the same address.
    let hb = std::thread::spawn({
        let dd = server.data_dir.clone();
        move || {
            std::process::Command::new(BIN)
                .args(["failover", "--vm", "b", "--kind", "unplanned"])
                .env("DRVAULT_DATA_DIR", dd)
                .output()
                .unwrap()
        }
    });
    let oc = server.cli(&["failover", "--vm", "c", "--kind", "unplanned"]);
    let ob = hb.join().unwrap();
    assert!(
        ob.status.success() && oc.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ob.stderr),
        String::from_utf8_lossy(&oc.stderr)
    );
    let ips: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|vm| {
            definition_dir(&server, vm).0["definition"]["nics"][0]["ip"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ips[0], "10.20.1.50");
    assert!(
        ips[1] != ips[2] && ips[1] != ips[0] && ips[2] != ips[0],
        "{ips:?}"
    );
    for ip in &ips[1..] {
        let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
        assert!((4..255).contains(&last), "{ip} is a reserved address");
    }
}

#[test]
fn recovery_plan_runs_groups_in_order_pauses_and_stops_on_a_failing_command() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some(NETWORKS));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let img = dir.join("d.raw");
    raw_image(&img, 2 * 1024 * 1024, &[(0, 50_000)], 8);
    for (i, vm) in ["web", "app", "db", "x1", "x2"].iter().enumerate() {
        server.cli_ok(&[
            "agent",
            "protect",
            "--creds",
            c,
            "--vm",
            vm,
            "--disk",
            &format!("{}:d", img.display()),
            "--nic",
            &format!("network=corp,mac=00:15:5d:00:03:0{i}"),
        ]);
    }
    let order = dir.join("order.txt");
    let o = order.display().to_string();
    server.cli_ok(&[
        "plan",
        "create",
        "three-tier",
        "--group",
        "db",
        "--group",
        "app",
        "--group",
        "web",
        "--post",
        &format!("1:echo db-done >> {o}"),
        "--pre",
        &format!("2:echo app-start >> {o}"),
        "--post",
        &format!("2:echo app-done >> {o}"),
        "--pause",
        "3",
    ]);
    let started = server.cli_ok(&[
        "failover",
        "--plan",
        "three-tier",
        "--kind",
        "unplanned",
        "--point",
        "latest-common",
        "--no-wait",
    ]);
    let job = started.split_whitespace().last().unwrap().to_string();
    server.wait_job(&job, "waiting_for_input");
    assert_eq!(
        std::fs::read_to_string(&order).unwrap(),
        "db-done\napp-start\napp-done\n",
        "groups 1 and 2 ran in order"
    );
    assert!(
        String::from_utf8_lossy(&server.cli(&["failover", "show", "--vm", "web"]).stderr)
            .contains("failover_not_found"),
        "group 3 waits for the manual action"
    );
    server.cli_ok(&["jobs", "resume", &job]);
    let j = server.wait_job(&job, "succeeded");
    assert!(
        j["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "succeeded"),
        "{j}"
    );
    for vm in ["db", "app", "web"] {
        let v: Value =
            serde_json::from_str(&server.cli_ok(&["failover", "show", "--vm", vm, "--json"]))
                .unwrap();
        assert_eq!(v["record"]["state"], "succeeded", "{vm}");
    }

    // A failing pre-command stops the plan before anything fails over.
    server.cli_ok(&[
        "plan", "create", "broken", "--group", "x1", "--group", "x2", "--pre", "1:exit 3",
    ]);
    let o = server.cli(&["failover", "--plan", "broken", "--kind", "unplanned"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exited with"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for vm in ["x1", "x2"] {
        assert!(
            !server
                .cli(&["failover", "show", "--vm", vm])
                .status
                .success(),
            "{vm} must not be failed over"
        );
    }
    assert!(
        !server
            .cli(&["plan", "create", "dup", "--group", "x1,x1"])
            .status
            .success(),
        "a VM twice is refused"
    );
    assert!(
        !server
            .cli(&["plan", "create", "ghost", "--group", "nope"])
            .status
            .success(),
        "unknown VMs are refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_added_later_clears_the_warning_and_vms_shows_an_uncommitted_failover() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    // Protected while no network is mapped: the VM warns.
    let server = Server::start(dir, Some("[vault]\nblock_size = 1048576\n"));
    let creds = server.add_host("hv", None);
    let host = server.client_with(&Server::host_token(&creds));
    let img = dir.join("d.raw");
    raw_image(&img, 2 * 1024 * 1024, &[(0, 100_000)], 4);
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "web01",
        "--disk",
        &format!("{}:d", img.display()),
        "--nic",
        "network=corp,mac=00:15:5d:00:01:01",
    ]);
    let vms = server.cli_ok(&["vms"]);
    assert!(vms.contains("no network mapping yet"), "{vms}");
    // The operator maps corp and restarts: the warning is gone, in the CLI and the API.
    let server = server.restart_clean(Some(NETWORKS));
    let vms = server.cli_ok(&["vms"]);
    assert!(!vms.contains("no network mapping yet"), "{vms}");
    let v: Value = server.operator().get_json("/v1/vms/web01").await.unwrap();
    assert_eq!(v["health"], "Normal", "{v}");
    assert!(v.get("failover").is_none(), "{v}");

    // A planned failover waits for the final log and says for which disk; cancel stops it.
    let follow = std::process::Command::new(BIN)
        .args(["failover", "--vm", "web01", "--kind", "planned"])
        .env("DRVAULT_DATA_DIR", &server.data_dir)
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let job = eventually_async(Duration::from_secs(60), "a job waits for input", || async {
        let jobs: Vec<Value> = server
            .operator()
            .get_json("/v1/jobs?vm=web01")
            .await
            .map_err(|e| e.to_string())?;
        jobs.iter()
            .find(|j| j["waiting_for"].is_string())
            .cloned()
            .ok_or_else(|| format!("{jobs:?}"))
    })
    .await;
    assert_eq!(job["state"], "waiting_for_input", "{job}");
    assert!(
        job["waiting_for"].as_str().unwrap().contains("disk d"),
        "{job}"
    );
    let v: Value = server.operator().get_json("/v1/vms/web01").await.unwrap();
    assert_eq!(v["failover"]["summary"], "failing over (planned)", "{v}");
    server.cli_ok(&["failover", "cancel", "--vm", "web01"]);
    let out = follow.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("waiting for the final log") && err.contains("of disk d"),
        "{err}"
    );
    assert!(err.contains("failover cancel --vm web01"), "{err}");
    assert!(err.contains("failover_cancelled"), "{err}");
    let v: Value = server.operator().get_json("/v1/vms/web01").await.unwrap();
    assert!(v.get("failover").is_none(), "cancelled: {v}");

    // With the final log in, the planned failover goes through; until the commit `vms` says so.
    send_log(
        &host,
        "web01",
        "d",
        &make_log(
            &[(0, vec![7u8; 4096])],
            drvault::format::hrl::Guid([9; 16]),
            drvault::format::hrl::Guid::NIL,
        ),
        drvault::format::hrl::Guid([9; 16]),
        None,
    )
    .await
    .unwrap();
    let vms = server.cli_ok(&["vms"]);
    assert!(vms.contains("protected"), "{vms}");
    let final_log = make_log(
        &[(4096, vec![8u8; 4096])],
        drvault::format::hrl::Guid([10; 16]),
        drvault::format::hrl::Guid([9; 16]),
    );
    let _: Value = host
        .send_stream(
            reqwest::Method::PUT,
            &format!(
                "/v1/agent/vms/web01/disks/d/logs/{}?final=true",
                drvault::format::hrl::Guid([10; 16])
            ),
            reqwest::Body::from(final_log.clone()),
            Some(final_log.len() as u64),
        )
        .await
        .unwrap();
    server.cli_ok(&["failover", "--vm", "web01", "--kind", "planned"]);
    let vms = server.cli_ok(&["vms"]);
    assert!(
        vms.contains("failed over (planned), not committed"),
        "{vms}"
    );
    let v: Value = server.operator().get_json("/v1/vms/web01").await.unwrap();
    assert_eq!(v["state"], "protected", "{v}");
    assert_eq!(v["failover"]["kind"], "planned", "{v}");
    assert_eq!(v["failover"]["state"], "succeeded", "{v}");
    server.cli_ok(&["failover", "commit", "--vm", "web01"]);
    let vms = server.cli_ok(&["vms"]);
    assert!(vms.contains("failed_over"), "{vms}");
    assert!(
        !vms.contains("not committed") && !vms.contains("no network mapping"),
        "{vms}"
    );
}

/// Failover output the server cannot write is the server's trouble, not the request's: the job
/// fails with `output_not_writable`, recoverable (503 class), having removed what it wrote and
/// released its addresses; once the folder is fixed the same failover succeeds and gets the
/// addresses the failed one held. A file in place of the output folder makes the folder
/// unwritable for every user, root included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_into_an_unwritable_folder_fails_recoverably_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let out = dir.join("failover-out");
    std::fs::write(&out, "a file where the failover folder should be").unwrap();
    let config = format!(
        "{NETWORKS}\n[failover]\noutput_dir = {:?}\n",
        out.display().to_string()
    );
    let server = Server::start(dir, Some(&config));
    let creds = server.add_host("hv", None);
    let img = dir.join("d.raw");
    raw_image(&img, 2 * 1024 * 1024, &[(0, 100_000)], 4);
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "web01",
        "--disk",
        &format!("{}:d", img.display()),
        "--nic",
        "network=corp,mac=00:15:5d:00:01:01,ip=10.20.1.50",
    ]);

    let o = server.cli(&["failover", "--vm", "web01", "--kind", "unplanned"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("output_not_writable"), "{err}");
    let jobs: Vec<Value> = server
        .operator()
        .get_json("/v1/jobs?vm=web01")
        .await
        .unwrap();
    let job = jobs
        .iter()
        .find(|j| j["kind"] == "unplanned_failover")
        .unwrap_or_else(|| panic!("{jobs:?}"));
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "output_not_writable", "{job}");
    assert_eq!(job["error"]["recoverable"], true, "{job}");
    let (v, _) = definition_dir(&server, "web01");
    assert_eq!(v["record"]["state"], "failed", "{v}");
    assert!(v["definition"].is_null(), "{v}");
    let vm: Value = server.operator().get_json("/v1/vms/web01").await.unwrap();
    assert_eq!(vm["state"], "protected", "{vm}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "a file where the failover folder should be",
        "nothing written over it"
    );

    // Fixed: the same request goes through and keeps the source address, which the failed
    // failover would still hold had it not released it.
    std::fs::remove_file(&out).unwrap();
    server.cli_ok(&["failover", "--vm", "web01", "--kind", "unplanned"]);
    let (v, fo_dir) = definition_dir(&server, "web01");
    assert_eq!(v["record"]["state"], "succeeded", "{v}");
    assert_eq!(v["definition"]["nics"][0]["ip"], "10.20.1.50", "{v}");
    assert!(fo_dir.join("d.vhd").is_file() && fo_dir.join("vm.json").is_file());
    let left: Vec<_> = std::fs::read_dir(out.join("web01"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left, vec![fo_dir], "only the successful failover's folder");
}

/// A server asked to stop while a failover runs lets it finish (within the shutdown grace)
/// instead of dropping it mid-write: after the restart the failover has succeeded, its disk is
/// whole, and it was not ended as interrupted. Chunk reads are slowed so the failover is
/// certainly still running when the stop arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopping_during_a_failover_waits_for_it() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (mut server, mut faults) = FaultRules::start(dir, Some(NETWORKS));
    let creds = server.add_host("hv", None);
    let img = dir.join("d.raw");
    raw_image(&img, 4 * 1024 * 1024, &[(0, 4 * 1024 * 1024)], 7);
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "web01",
        "--disk",
        &format!("{}:d", img.display()),
        "--nic",
        "network=corp,mac=00:15:5d:00:01:01",
    ]);
    faults.set(&server, "op=get prefix=chunks/ kind=latency ms=1500");
    server.cli_ok(&[
        "failover",
        "--vm",
        "web01",
        "--kind",
        "unplanned",
        "--no-wait",
    ]);
    let v: Value = server.operator().get_json("/v1/vms/web01").await.unwrap();
    assert_eq!(v["failover"]["state"], "running", "{v}");
    let addr = server.addr();
    let st = server.stop();
    assert!(st.success(), "server stopped with {st}: {}", server.log());

    let server = Server::start_at(dir, Some(NETWORKS), &addr);
    let (v, fo_dir) = definition_dir(&server, "web01");
    assert_eq!(v["record"]["state"], "succeeded", "{v}");
    assert!(v["record"]["error"].is_null(), "{v}");
    let vhd = fo_dir.join("d.vhd");
    assert_eq!(
        std::fs::metadata(&vhd).unwrap().len(),
        4 * 1024 * 1024 + 512,
        "a whole fixed VHD"
    );
    assert!(qemu_identical(&vhd, "vpc", &img, "raw"));
}
