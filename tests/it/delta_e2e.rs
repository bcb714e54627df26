//! Delta replication end to end: MS-HRL logs made by the writer (and by `drvault hrl diff`)
//! replicated over HTTPS, exported at every recovery point and compared with a flat model;
//! the same after a merge and after a restart; and every bad log refused with the journal and
//! the points unchanged.

use crate::common;

use common::*;
use drvault::client::Client;
use drvault::format::hrl::{Guid, HrlWriter, HrlWriterParams};
use reqwest::Method;
use serde_json::{json, Value};

const BLOCK: &str = "[vault]\nblock_size = 65536\n";

fn guid(n: u64) -> Guid {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&n.to_le_bytes());
    b[8] = 0x42;
    Guid(b)
}

fn export_raw(
    server: &Server,
    vm: &str,
    disk: &str,
    point: Option<&str>,
    out: &std::path::Path,
) -> Vec<u8> {
    let mut args = vec![
        "export",
        "--vm",
        vm,
        "--disk",
        disk,
        "--format",
        "raw",
        "-o",
        out.to_str().unwrap(),
    ];
    if let Some(p) = point {
        args.push("--point");
        args.push(p);
    }
    server.cli_ok(&args);
    std::fs::read(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_every_point_merge_and_restart() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let mut server = Server::start(&dir, Some(BLOCK));
    let creds = server.add_host("hv", None);
    let size = 8 * MIB + 512 * 7;
    let img = dir.join("base.raw");
    raw_image(&img, size, &[(0, 200_000), (MIB + 4096, 300_000)], 5);
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "m",
        "--disk",
        &format!("{}:d", img.display()),
    ]);
    let host = server.client_with(&Server::host_token(&creds));

    let mut model = std::fs::read(&img).unwrap();
    let mut snapshots = vec![model.clone()];
    let mut prev = Guid::NIL;
    for cycle in 1..=5u64 {
        let writes = random_writes(cycle * 1000, size, 40);
        for (off, data) in &writes {
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        snapshots.push(model.clone());
        let id = guid(cycle);
        let log = make_log(&writes, id, prev);
        let ack = send_log(&host, "m", "d", &log, id, None).await.unwrap();
        assert_eq!(ack["status"], "accepted");
        assert_eq!(ack["cycle"], cycle);
        // A retry of the same log is acknowledged again and changes nothing.
        let again = send_log(&host, "m", "d", &log, id, None).await.unwrap();
        assert_eq!(again["status"], "already_accepted");
        prev = id;
    }
    let points: Vec<Value> = server
        .operator()
        .get_json("/v1/vms/m/points")
        .await
        .unwrap();
    assert_eq!(
        points
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["c0", "c1", "c2", "c3", "c4", "c5"]
    );
    let out = dir.join("out.raw");
    let check = |server: &Server, from: usize| {
        for (c, snap) in snapshots.iter().enumerate().skip(from) {
            let got = export_raw(server, "m", "d", Some(&format!("c{c}")), &out);
            assert!(got == *snap, "point c{c} differs from the model");
        }
        assert!(export_raw(server, "m", "d", Some("latest"), &out) == *snapshots.last().unwrap());
    };
    check(&server, 0);

    // Merge through c2: c0 and c1 disappear, every retained point reads the same.
    let r: Value = server
        .operator()
        .send_json(Method::POST, "/v1/vms/m/merge", &json!({"through": "c2"}))
        .await
        .unwrap();
    assert_eq!(r["logs_merged"], 2);
    check(&server, 2);
    let gone = server.cli(&[
        "export",
        "--vm",
        "m",
        "--disk",
        "d",
        "--point",
        "c1",
        "--format",
        "raw",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        !gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("point_not_found")
    );
    assert!(
        export_raw(&server, "m", "d", None, &out) == snapshots[5],
        "without --point the export is the latest point, not the base map (now c2)"
    );

    // A restart loses nothing; the chain continues from the last log.
    assert!(server.stop().success());
    let server = Server::start(&dir, Some(BLOCK));
    check(&server, 2);
    let writes = random_writes(77, size, 10);
    for (off, data) in &writes {
        model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let ack = send_log(
        &host_for(&server, &creds),
        "m",
        "d",
        &make_log(&writes, guid(6), prev),
        guid(6),
        None,
    )
    .await
    .unwrap();
    assert_eq!(ack["cycle"], 6);
    assert!(export_raw(&server, "m", "d", Some("latest"), &out) == model);
    let vm: Value = server.operator().get_json("/v1/vms/m").await.unwrap();
    assert_eq!(vm["disks"][0]["journal_length"], 4);
    assert_eq!(vm["health"], "Normal");
}

fn host_for(server: &Server, creds: &std::path::Path) -> Client {
    server.client_with(&Server::host_token(creds))
}

#[test]
fn hrl_diff_of_real_ext4_images_replicates_and_fscks_clean() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, None);
    let creds = server.add_host("hv", None);
    let src = dir.join("files");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..30 {
        std::fs::write(
            src.join(format!("keep{i}.txt")),
            format!("file {i}\n").repeat(3000),
        )
        .unwrap();
        std::fs::write(src.join(format!("gone{i}.bin")), pseudo_random(20_000, i)).unwrap();
    }
    let v1 = dir.join("v1.raw");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            src.to_str().unwrap(),
            v1.to_str().unwrap(),
            "40M",
        ],
    );
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "fs",
        "--disk",
        &format!("{}:data", v1.display()),
    ]);
    // Files deleted and added between the two states, with debugfs on a copy (no mount needed).
    let v2 = dir.join("v2.raw");
    std::fs::copy(&v1, &v2).unwrap();
    std::fs::write(dir.join("new.bin"), pseudo_random(700_000, 9)).unwrap();
    let mut cmds = String::new();
    for i in 0..30 {
        cmds.push_str(&format!("rm gone{i}.bin\n"));
    }
    cmds.push_str(&format!(
        "write {} added.bin\n",
        dir.join("new.bin").display()
    ));
    std::fs::write(dir.join("cmds"), cmds).unwrap();
    run(
        "debugfs",
        &[
            "-w",
            "-f",
            dir.join("cmds").to_str().unwrap(),
            v2.to_str().unwrap(),
        ],
    );
    let log = dir.join("c1.hrl");
    let out = server.cli_ok(&[
        "hrl",
        "diff",
        v1.to_str().unwrap(),
        v2.to_str().unwrap(),
        "-o",
        log.to_str().unwrap(),
        "--json",
    ]);
    let s: Value = serde_json::from_str(&out).unwrap();
    assert!(s["data_bytes"].as_u64().unwrap() >= 700_000);
    let ack: Value = serde_json::from_str(&server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "fs",
        "--disk",
        "data",
        "--hrl",
        log.to_str().unwrap(),
        "--app-consistent",
        "--json",
    ]))
    .unwrap();
    assert_eq!(ack["status"], "accepted");
    let vhd = dir.join("fs.vhd");
    server.cli_ok(&[
        "export",
        "--vm",
        "fs",
        "--disk",
        "data",
        "--point",
        "latest-app",
        "--format",
        "vhd",
        "-o",
        vhd.to_str().unwrap(),
    ]);
    assert!(
        qemu_identical(&vhd, "vpc", &v2, "raw"),
        "export at the new point differs from the new image"
    );
    let raw = dir.join("fs.raw");
    server.cli_ok(&[
        "export",
        "--vm",
        "fs",
        "--disk",
        "data",
        "--point",
        "latest",
        "--format",
        "raw",
        "-o",
        raw.to_str().unwrap(),
    ]);
    run("e2fsck", &["-fn", raw.to_str().unwrap()]);
    let listing = run("debugfs", &["-R", "ls", raw.to_str().unwrap()]);
    assert!(listing.contains("added.bin") && !listing.contains("gone3.bin"));
    // `hrl apply` reproduces the new image from the old one.
    let applied = dir.join("applied.raw");
    std::fs::copy(&v1, &applied).unwrap();
    server.cli_ok(&[
        "hrl",
        "apply",
        log.to_str().unwrap(),
        applied.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&applied).unwrap() == std::fs::read(&v2).unwrap());
    let points: Value =
        serde_json::from_str(&server.cli_ok(&["points", "--vm", "fs", "--json"])).unwrap();
    assert_eq!(points[1]["kind"], "app_consistent");
}

fn fix_header_checksum(log: &mut [u8]) {
    log[40..44].copy_from_slice(&[0; 4]);
    let sum: u32 = log[..4096]
        .iter()
        .map(|b| *b as u32)
        .fold(0u32, |a, b| a.wrapping_add(b));
    log[40..44].copy_from_slice(&(!sum).to_le_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logs_are_refused_and_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let server = Server::start(
        &dir,
        Some(&format!("{BLOCK}[ingest]\nmax_log_bytes = 400000\n")),
    );
    let creds = server.add_host("hv", None);
    let host = server.client_with(&Server::host_token(&creds));
    let size = MIB;
    let img = dir.join("d.raw");
    raw_image(&img, size, &[(0, 100_000)], 1);
    for vm in ["a", "b", "c", "d"] {
        server.cli_ok(&[
            "agent",
            "protect",
            "--creds",
            creds.to_str().unwrap(),
            "--vm",
            vm,
            "--disk",
            &format!("{}:d", img.display()),
        ]);
    }
    let good1 = make_log(&[(4096, vec![1u8; 8192])], guid(1), Guid::NIL);
    send_log(&host, "a", "d", &good1, guid(1), None)
        .await
        .unwrap();
    let op = server.operator();
    let snapshot = || async {
        let vm: Value = op.get_json("/v1/vms/a").await.unwrap();
        let points: Value = op.get_json("/v1/vms/a/points").await.unwrap();
        (server.vault_objects("logs"), vm["disks"].clone(), points)
    };
    let before = snapshot().await;

    let next = make_log(
        &[(8192, vec![2u8; 4096]), (MIB - 1024, vec![3u8; 1024])],
        guid(2),
        guid(1),
    );
    let mut cases: Vec<(&str, Vec<u8>, Guid, &str)> = Vec::new();
    cases.push((
        "truncated",
        next[..next.len() - 100].to_vec(),
        guid(2),
        "invalid_log",
    ));
    let mut b = next.clone();
    b[300] ^= 1;
    cases.push(("flipped bit in the header", b, guid(2), "invalid_log"));
    let mut b = next.clone();
    b[4096 + 20] ^= 1;
    cases.push((
        "flipped bit in a metadata header",
        b,
        guid(2),
        "invalid_log",
    ));
    let eol = u64::from_le_bytes(next[44..52].try_into().unwrap()) as usize;
    let mut b = next.clone();
    b[eol - 4096 + 32 + 2] ^= 1;
    cases.push(("flipped bit in an entry", b, guid(2), "invalid_log"));
    let mut b = next.clone();
    b[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    fix_header_checksum(&mut b);
    cases.push(("version 1", b, guid(2), "invalid_log"));
    let mut b = next.clone();
    b[56..60].copy_from_slice(&1000u32.to_le_bytes());
    fix_header_checksum(&mut b);
    cases.push((
        "metadata size not a multiple of 512",
        b,
        guid(2),
        "invalid_log",
    ));
    cases.push((
        "extent past the disk end",
        make_log(&[(MIB, vec![1u8; 512])], guid(2), guid(1)),
        guid(2),
        "invalid_log",
    ));
    cases.push((
        "URL names another log",
        next.clone(),
        guid(3),
        "log_id_mismatch",
    ));
    cases.push(("not a log at all", vec![0u8; 9000], guid(2), "invalid_log"));
    cases.push((
        "larger than the configured maximum",
        make_log(&[(0, vec![5u8; 512_000])], guid(2), guid(1)),
        guid(2),
        "log_too_large",
    ));
    for (what, log, id, code) in &cases {
        let (st, c, rec) = refused(send_log(&host, "a", "d", log, *id, None).await);
        assert_eq!(c, *code, "{what}");
        assert!(!rec, "{what}: not recoverable");
        assert!(st.is_client_error(), "{what}: {st}");
        assert_eq!(
            snapshot().await,
            before,
            "{what}: the journal or points changed"
        );
    }
    // Unknown disk, unknown VM, a log before initial replication finished.
    assert_eq!(
        refused(send_log(&host, "a", "nope", &next, guid(2), None).await).1,
        "disk_not_found"
    );
    assert_eq!(
        refused(send_log(&host, "zz", "d", &next, guid(2), None).await).1,
        "vm_not_found"
    );
    let _: Value = host
        .send_json(
            Method::PUT,
            "/v1/agent/vms/early",
            &json!({"disks": [{"id": "d", "size": MIB}]}),
        )
        .await
        .unwrap();
    assert_eq!(
        refused(send_log(&host, "early", "d", &good1, guid(1), None).await).1,
        "replication_incomplete"
    );
    // The good next log still goes in after all that.
    assert_eq!(
        send_log(&host, "a", "d", &next, guid(2), None)
            .await
            .unwrap()["cycle"],
        2
    );

    // Chain rules: each marks its disk resync-required (VM health Critical) and applies nothing.
    send_log(&host, "b", "d", &good1, guid(1), None)
        .await
        .unwrap();
    let fork = make_log(&[(0, vec![9u8; 512])], guid(9), guid(7));
    assert_eq!(
        refused(send_log(&host, "b", "d", &fork, guid(9), None).await).1,
        "chain_broken"
    );
    let mut unclosed = make_log(&[(0, vec![9u8; 512])], guid(10), Guid::NIL);
    unclosed[44..52].copy_from_slice(&[0; 8]);
    fix_header_checksum(&mut unclosed);
    assert_eq!(
        refused(send_log(&host, "c", "d", &unclosed, guid(10), None).await).1,
        "log_not_closed"
    );
    let params = HrlWriterParams {
        unique_id: guid(12),
        previous_unique_id: guid(1),
        vhd2_data_write_guid: guid(99),
        ..Default::default()
    };
    let mut w = HrlWriter::in_memory(params).unwrap();
    w.add_write(0, &[1u8; 512]).unwrap();
    send_log(&host, "d", "d", &good1, guid(1), None)
        .await
        .unwrap();
    assert_eq!(
        refused(send_log(&host, "d", "d", &w.finish_to_vec().unwrap(), guid(12), None).await).1,
        "offline_change"
    );
    for vm in ["b", "c", "d"] {
        let v: Value = op.get_json(&format!("/v1/vms/{vm}")).await.unwrap();
        // Resync required, but a session is open: Warning, not Critical (nothing is stuck).
        assert_eq!(v["health"], "Warning", "{vm}: {v}");
        assert!(v["disks"][0]["resync_required"].is_string());
        let why = v["health_reasons"][0].as_str().unwrap();
        assert!(
            why.contains("resynchronization scheduled")
                || why.contains("resynchronization running"),
            "{v}"
        );
        assert_eq!(v["resync"]["disks"][0], "d", "{v}");
        // A resync session opened by itself; later logs wait for it (recoverable).
        let r: Value = op.get_json(&format!("/v1/vms/{vm}/resync")).await.unwrap();
        assert!(
            ["scheduled", "active"].contains(&r["state"].as_str().unwrap()),
            "{r}"
        );
        let after = make_log(&[(0, vec![1u8; 512])], guid(50), guid(1));
        let (_, code, recoverable) =
            refused(send_log(&host, vm, "d", &after, guid(50), None).await);
        assert_eq!(code, "resync_in_progress");
        assert!(recoverable);
    }
    let b_points: Vec<Value> = op.get_json("/v1/vms/b/points").await.unwrap();
    assert_eq!(b_points.len(), 2, "the refused fork added no point");
}

/// A server with one host and `vm` protected with two raw disks (`(id, size)`, each holding one
/// 4 KiB block of data): the set-up of the tests on VM points over several disks. Returns the
/// server, the host's client and its credentials file; disk `id` is the file `dir/id.raw`.
fn protected_two_disk_vm(
    dir: &std::path::Path,
    vm: &str,
    disks: [(&str, u64); 2],
) -> (Server, Client, std::path::PathBuf) {
    let server = Server::start(dir, Some(BLOCK));
    let creds = server.add_host("hv", None);
    let host = server.client_with(&Server::host_token(&creds));
    let mut args = vec![
        "agent".to_string(),
        "protect".into(),
        "--creds".into(),
        creds.display().to_string(),
        "--vm".into(),
        vm.into(),
    ];
    for (seed, (id, size)) in (1..).zip(disks) {
        let path = dir.join(format!("{id}.raw"));
        raw_image(&path, size, &[(0, 4096)], seed);
        args.extend(["--disk".into(), format!("{}:{id}", path.display())]);
    }
    server.cli_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (server, host, creds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_kept_over_half_the_disk_need_no_resync_and_vm_points_need_every_disk() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let (server, host, creds) = protected_two_disk_vm(&dir, "two", [("a", MIB), ("b", 2 * MIB)]);
    // Cycle 1 on both disks is a VM point; cycle 2 only on disk a is not.
    send_log(
        &host,
        "two",
        "a",
        &make_log(&[(0, vec![1u8; 4096])], guid(1), Guid::NIL),
        guid(1),
        Some(1),
    )
    .await
    .unwrap();
    send_log(
        &host,
        "two",
        "b",
        &make_log(&[(0, vec![2u8; 4096])], guid(2), Guid::NIL),
        guid(2),
        Some(1),
    )
    .await
    .unwrap();
    send_log(
        &host,
        "two",
        "a",
        &make_log(&[(0, vec![3u8; 4096])], guid(3), guid(1)),
        guid(3),
        Some(2),
    )
    .await
    .unwrap();
    let points: Vec<Value> = server
        .operator()
        .get_json("/v1/vms/two/points")
        .await
        .unwrap();
    assert_eq!(
        points
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["c0", "c1", "c2"]
    );
    assert_eq!(
        points[2]["kind"], "incomplete",
        "c2 waits for b: {points:?}"
    );
    assert_eq!(points[2]["waiting_for"], json!(["b"]));
    // 600 KiB of log kept on a 1 MiB disk: logs within retention never trigger the 50% rule
    // (only the host's backlog of unsent logs does, tests/it/health.rs).
    let big = make_log(
        &[(0, pseudo_random(600 * KIB as usize, 3))],
        guid(4),
        guid(3),
    );
    let ack = send_log(&host, "two", "a", &big, guid(4), Some(3))
        .await
        .unwrap();
    assert_eq!(ack["status"], "accepted");
    assert!(ack["resync_required"].is_null(), "{ack}");
    let vm: Value = server.operator().get_json("/v1/vms/two").await.unwrap();
    assert!(vm["resync"].is_null(), "no resync for logs kept: {vm}");
    let c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let metrics = c
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The operator changes the policy; invalid values are refused; the agent's re-run still matches.
    let out = server.cli_ok(&["vm", "set", "two", "--interval", "30s", "--retention", "7d"]);
    assert!(out.contains("retention 604800 s"), "{out}");
    assert!(
        !server
            .cli(&["vm", "set", "two", "--interval", "0s"])
            .status
            .success(),
        "0 s is not an allowed interval"
    );
    let v: Value = server.operator().get_json("/v1/vms/two").await.unwrap();
    assert_eq!(v["policy"]["interval_s"], 30);
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "two",
        "--disk",
        &format!("{}:a", dir.join("a.raw").display()),
        "--disk",
        &format!("{}:b", dir.join("b.raw").display()),
    ]);
    for m in [
        "drvault_disk_pending_log_bytes",
        "drvault_disk_journal_length",
        "drvault_disk_resync_required",
        "drvault_vm_rpo_seconds",
        "drvault_logs_accepted_total",
    ] {
        assert!(metrics.contains(m), "/metrics lacks {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cycle_not_every_disk_sent_is_listed_incomplete_and_refused_by_name() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let (server, host, _) = protected_two_disk_vm(&dir, "web01", [("os", MIB), ("data", MIB)]);
    send_log(
        &host,
        "web01",
        "os",
        &make_log(&[(0, vec![1u8; 4096])], guid(1), Guid::NIL),
        guid(1),
        Some(1),
    )
    .await
    .unwrap();
    // The API lists c1 as incomplete, waiting for data; c0 is the initial replication.
    let points: Vec<Value> = server
        .operator()
        .get_json("/v1/vms/web01/points")
        .await
        .unwrap();
    assert_eq!(points.len(), 2, "{points:?}");
    assert_eq!(points[0]["id"], "c0");
    assert_eq!(points[0]["kind"], "initial");
    assert_eq!(points[1]["id"], "c1");
    assert_eq!(points[1]["kind"], "incomplete");
    assert_eq!(points[1]["waiting_for"], json!(["data"]));
    assert_eq!(points[1]["disks"], json!(["os"]));
    let listed = server.cli_ok(&["points", "--vm", "web01"]);
    let c1 = listed
        .lines()
        .find(|l| l.starts_with("c1 "))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(c1.contains("incomplete: waiting for data"), "{listed}");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("c0 ") && l.contains("initial")),
        "{listed}"
    );
    // Asking for it by name says why it cannot be had, not "no retained recovery point".
    let scratch = dir.join("x.raw");
    for args in [
        vec!["merge", "--vm", "web01", "--through", "c1"],
        vec![
            "export",
            "--vm",
            "web01",
            "--disk",
            "os",
            "--point",
            "c1",
            "--format",
            "raw",
            "-o",
            scratch.to_str().unwrap(),
        ],
        vec![
            "failover",
            "--vm",
            "web01",
            "--kind",
            "unplanned",
            "--point",
            "c1",
        ],
    ] {
        let o = server.cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(
            err.contains("point_incomplete")
                && err.contains("c1")
                && err.contains("not complete yet")
                && err.contains("waiting for disk data"),
            "{args:?}: {err}"
        );
        assert!(
            !err.contains("no retained recovery point"),
            "{args:?}: {err}"
        );
    }
    // The refused merge left no job running.
    let jobs: Vec<Value> = server.operator().get_json("/v1/jobs").await.unwrap();
    assert!(
        jobs.iter().all(|j| j["state"] != "running"),
        "a job still runs: {jobs:?}"
    );
    // Once data sends its log, c1 is a point like any other.
    send_log(
        &host,
        "web01",
        "data",
        &make_log(&[(0, vec![2u8; 4096])], guid(2), Guid::NIL),
        guid(2),
        Some(1),
    )
    .await
    .unwrap();
    let points: Vec<Value> = server
        .operator()
        .get_json("/v1/vms/web01/points")
        .await
        .unwrap();
    assert_eq!(points[1]["kind"], "crash_consistent", "{points:?}");
    assert!(points[1].get("waiting_for").is_none(), "{points:?}");
    let got = export_raw(&server, "web01", "data", Some("c1"), &scratch);
    assert_eq!(&got[..4096], &[2u8; 4096][..]);
}
