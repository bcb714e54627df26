//! Resynchronization end to end against a real server: the off-hours window, logs paused, only
//! changed 4 KiB pieces sent, an interrupted agent and a restarted server resuming, bad uploads
//! refused with nothing changed, the switch to a new point with the old points still readable,
//! the log chain restarting, and a cancelled resync leaving the replica as it was.

use crate::common;

use std::path::Path;

use common::*;
use drvault::chunk::PlainHash;
use drvault::replica::patch;
use serde_json::Value;

const SIZE: u64 = 24 * MIB;

/// A config whose resync window is closed now (it opens in about six hours, server local time).
fn config_with_closed_window() -> String {
    let h: u32 = run("date", &["+%H"]).trim().parse().unwrap();
    let start = (h + 6) % 24;
    format!("[vault]\nblock_size = 1048576\n\n[resync]\nwindow = \"{start:02}:00-{start:02}:30\"\n")
}

fn export(server: &Server, vm: &str, point: &str, out: &Path) -> Vec<u8> {
    succeeded(&server.export(vm, "d", point, "raw", out), "export");
    std::fs::read(out).unwrap()
}

/// The changes between replica and source: 40 scattered 4 KiB writes, a 256 KiB extent, a data
/// MiB turned to zeros and new data in the disk's last 4 KiB. Returns the bytes changed.
fn change(path: &Path, seed: u64) -> u64 {
    let mut changed = 0;
    for k in 0..40u64 {
        let at = (k * 7919 + seed * 13) % (SIZE / 4096) * 4096;
        write_at(path, at, &pseudo_random(4096, seed + k));
        changed += 4096;
    }
    write_at(
        path,
        9 * MIB + 12288,
        &pseudo_random(256 * 1024, seed + 100),
    );
    write_at(path, 3 * MIB, &vec![0u8; MIB as usize]);
    write_at(path, SIZE - 4096, &pseudo_random(4096, seed + 200));
    changed + 256 * 1024 + MIB + 4096
}

/// Points a credentials file at `server` (a restarted test server gets a new port).
fn repoint(creds: &Path, server: &Server) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(creds).unwrap()).unwrap();
    v["server"] = Value::from(server.url.clone());
    std::fs::write(creds, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn agent_resync(server: &Server, creds: &str, vm: &str, src: &Path) -> std::process::Output {
    server.cli(&[
        "agent",
        "resync",
        "--creds",
        creds,
        "--vm",
        vm,
        "--disk",
        "d",
        "--json",
        src.to_str().unwrap(),
    ])
}

#[test]
fn resync_sends_only_what_changed_resumes_and_switches_the_replica() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let cfg = config_with_closed_window();
    let mut server = Server::start(dir, Some(&cfg));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let other_creds = server.add_host("hv2", None);
    let src = dir.join("src.raw");
    raw_image(&src, SIZE, &[(0, 20 * MIB as usize)], 1);
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        c,
        "--vm",
        "web",
        "--disk",
        &format!("{}:d", src.display()),
    ]);
    // One cycle of delta replication: point c1.
    let v1 = dir.join("v1.raw");
    std::fs::copy(&src, &v1).unwrap();
    write_at(&v1, 5 * MIB, &[7u8; 8192]);
    let log1 = dir.join("1.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        src.to_str().unwrap(),
        v1.to_str().unwrap(),
        "-o",
        log1.to_str().unwrap(),
        "--unique-id",
        "11111111-1111-1111-1111-111111111111",
    ]);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "web",
        "--disk",
        "d",
        "--hrl",
        log1.to_str().unwrap(),
    ]);
    let c1_content = std::fs::read(&v1).unwrap();

    // The source drifts away from the replica (as if logs were lost).
    let source = dir.join("source.raw");
    std::fs::copy(&v1, &source).unwrap();
    let changed = change(&source, 5);

    // The operator asks for a resync: it waits for the window; the agent is told so, and logs
    // are paused (recoverable: exit code 3).
    let out = server.cli_ok(&["resync", "--vm", "web"]);
    assert!(out.contains("scheduled"), "{out}");
    let o = agent_resync(&server, c, "web", &source);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("resync_scheduled"));
    let log2 = dir.join("2.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        v1.to_str().unwrap(),
        source.to_str().unwrap(),
        "-o",
        log2.to_str().unwrap(),
        "--previous-id",
        "11111111-1111-1111-1111-111111111111",
    ]);
    let o = server.cli(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "web",
        "--disk",
        "d",
        "--hrl",
        log2.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resync_in_progress"));

    let out = server.cli_ok(&["resync", "--vm", "web", "--now"]);
    assert!(out.contains("active"), "{out}");

    // Bad uploads are refused and change nothing.
    let host = server.client_with(&Server::host_token(&creds));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = "/v1/agent/vms/web/disks/d/resync";
    let hashes_before = rt
        .block_on(host.get_bytes(&format!("{base}/hashes")))
        .unwrap()
        .0;
    assert_eq!(hashes_before.len(), 24 * 32);
    let block0 = std::fs::read(&source).unwrap()[..MIB as usize].to_vec();
    let full_patch = patch::encode(&block0, &[(0, MIB as u32)]);
    let put = |path: &str, hash: String, body: Vec<u8>| {
        rt.block_on(host.put_bytes::<Value>(
            path,
            &[("x-drvault-blake3", hash)],
            bytes::Bytes::from(body),
        ))
    };
    let code =
        |r: Result<Value, drvault::client::ClientError>| r.unwrap_err().code().map(String::from);
    assert_eq!(
        code(put(
            &format!("{base}/blocks/0"),
            PlainHash([9; 32]).to_hex(),
            full_patch.clone()
        ))
        .as_deref(),
        Some("hash_mismatch")
    );
    assert_eq!(
        code(put(
            &format!("{base}/blocks/24"),
            PlainHash::of(&block0).to_hex(),
            full_patch.clone()
        ))
        .as_deref(),
        Some("block_out_of_range")
    );
    assert_eq!(
        code(put(
            &format!("{base}/blocks/0"),
            PlainHash::of(&block0).to_hex(),
            vec![0, 1, 2]
        ))
        .as_deref(),
        Some("invalid_patch")
    );
    let other = server.client_with(&Server::host_token(&other_creds));
    assert!(rt
        .block_on(other.put_bytes::<Value>(
            &format!("{base}/blocks/0"),
            &[("x-drvault-blake3", PlainHash::of(&block0).to_hex())],
            bytes::Bytes::from(full_patch.clone()),
        ))
        .is_err());
    assert_eq!(
        rt.block_on(host.get_bytes(&format!("{base}/hashes")))
            .unwrap()
            .0,
        hashes_before,
        "refused uploads left the session unchanged"
    );

    // An interrupted agent: only the first two differing blocks made it.
    let theirs: Vec<&[u8]> = hashes_before.chunks(32).collect();
    let src_bytes = std::fs::read(&source).unwrap();
    let mut sent_early = 0;
    for i in 0..24usize {
        let block = &src_bytes[i * MIB as usize..(i + 1) * MIB as usize];
        if PlainHash::of(block).0 == theirs[i] || sent_early == 2 {
            continue;
        }
        let fine = rt
            .block_on(
                host.post_json_bytes(&format!("{base}/fine"), &serde_json::json!({"blocks": [i]})),
            )
            .unwrap();
        let p = patch::encode(block, &patch::differing_ranges(block, &fine));
        put(
            &format!("{base}/blocks/{i}"),
            PlainHash::of(block).to_hex(),
            p,
        )
        .unwrap();
        sent_early += 1;
    }
    // ... and the server restarts in the middle of the session.
    server.stop();
    let server = Server::start(dir, Some(&cfg));
    // The restarted server listens on a new port; the host's credentials follow it.
    repoint(&creds, &server);

    let o = agent_resync(&server, c, "web", &source);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["blocks_compared"], 24);
    let differing = s["blocks_differing"].as_u64().unwrap();
    assert!(differing >= 10, "{s}");
    assert_eq!(s["blocks_uploaded"].as_u64().unwrap(), differing, "{s}");
    assert_eq!(s["state"], "committed", "{s}");
    assert_eq!(s["cycle"], 2, "{s}");
    // Bytes on the wire track bytes changed: at most the changed 4 KiB pieces plus 9 bytes per
    // range; the zeroed MiB costs headers only.
    let up = s["bytes_uploaded"].as_u64().unwrap();
    assert!(
        up <= changed - MIB + 4096 * 8 + 9 * 64,
        "{up} bytes sent for {changed} changed"
    );
    assert!(
        up >= 40 * 4096 / 2,
        "{up}: too few bytes for the scattered writes"
    );

    // The replica equals the source; the old points still read as they were.
    assert!(
        export(&server, "web", "latest", &dir.join("l.raw")) == std::fs::read(&source).unwrap()
    );
    assert!(export(&server, "web", "c1", &dir.join("c1.raw")) == c1_content);
    let points: Value =
        serde_json::from_str(&server.cli_ok(&["points", "--vm", "web", "--json"])).unwrap();
    let ids: Vec<&str> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c0", "c1", "c2"]);

    // Logs flow again: one continuing the pre-resync chain is refused (its changes are in the
    // resynced replica); a new chain on the resynced content is accepted.
    let o = server.cli(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "web",
        "--disk",
        "d",
        "--hrl",
        log2.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("log_predates_resync"));
    let after = dir.join("after.raw");
    std::fs::copy(&source, &after).unwrap();
    write_at(&after, 17 * MIB, &[3u8; 4096]);
    let log3 = dir.join("3.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        source.to_str().unwrap(),
        after.to_str().unwrap(),
        "-o",
        log3.to_str().unwrap(),
    ]);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "web",
        "--disk",
        "d",
        "--hrl",
        log3.to_str().unwrap(),
    ]);
    assert!(
        export(&server, "web", "latest", &dir.join("l3.raw")) == std::fs::read(&after).unwrap()
    );

    // Merging through the snapshot keeps every later point exact.
    server.cli_ok(&["merge", "--vm", "web", "--all"]);
    assert!(
        export(&server, "web", "latest", &dir.join("l4.raw")) == std::fs::read(&after).unwrap()
    );
    let job: Value = serde_json::from_str(&server.cli_ok(&["jobs", "--json"])).unwrap();
    assert!(
        job.as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "resync" && j["state"] == "succeeded"),
        "{job}"
    );
}

#[test]
fn a_cancelled_resync_leaves_the_replica_and_a_broken_chain_opens_one() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(
        dir,
        Some("[vault]\nblock_size = 1048576\n[resync]\nwindow = \"\"\n"),
    );
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let src = dir.join("src.raw");
    raw_image(&src, 8 * MIB, &[(0, 8 * MIB as usize)], 2);
    let before = std::fs::read(&src).unwrap();
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        c,
        "--vm",
        "db",
        "--disk",
        &format!("{}:d", src.display()),
    ]);
    // A log whose predecessor is not the chain head breaks the chain: the disk is marked and a
    // session opens at once (no window configured).
    let v1 = dir.join("v1.raw");
    std::fs::copy(&src, &v1).unwrap();
    write_at(&v1, MIB, &[1u8; 4096]);
    let l1 = dir.join("1.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        src.to_str().unwrap(),
        v1.to_str().unwrap(),
        "-o",
        l1.to_str().unwrap(),
    ]);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "db",
        "--disk",
        "d",
        "--hrl",
        l1.to_str().unwrap(),
    ]);
    let l2 = dir.join("2.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        src.to_str().unwrap(),
        v1.to_str().unwrap(),
        "-o",
        l2.to_str().unwrap(),
        "--previous-id",
        "22222222-2222-2222-2222-222222222222",
    ]);
    let o = server.cli(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "db",
        "--disk",
        "d",
        "--hrl",
        l2.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("chain_broken"));
    let s: Value =
        serde_json::from_str(&server.cli_ok(&["resync", "--vm", "db", "--status", "--json"]))
            .unwrap();
    assert_eq!(s["state"], "active", "{s}");
    assert!(s["reason"].as_str().unwrap().contains("follows"), "{s}");

    // Half a resync, then cancel: every point reads as before, the stage is gone.
    let changed = dir.join("changed.raw");
    std::fs::copy(&v1, &changed).unwrap();
    write_at(&changed, 0, &vec![9u8; 2 * MIB as usize]);
    let host = server.client_with(&Server::host_token(&creds));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let block = std::fs::read(&changed).unwrap()[..MIB as usize].to_vec();
    rt.block_on(host.put_bytes::<Value>(
        "/v1/agent/vms/db/disks/d/resync/blocks/0",
        &[("x-drvault-blake3", PlainHash::of(&block).to_hex())],
        bytes::Bytes::from(patch::encode(&block, &[(0, MIB as u32)])),
    ))
    .unwrap();
    assert!(!server.vault_objects("stage").is_empty());
    let out = server.cli_ok(&["resync", "--vm", "db", "--cancel"]);
    assert!(out.contains("cancelled"), "{out}");
    assert!(export(&server, "db", "latest", &dir.join("l.raw")) == std::fs::read(&v1).unwrap());
    assert!(export(&server, "db", "c0", &dir.join("c0.raw")) == before);
    eventually(
        std::time::Duration::from_secs(30),
        "staged receipts removed",
        || {
            let left = server.vault_objects("stage");
            left.is_empty()
                .then_some(())
                .ok_or_else(|| format!("{left:?}"))
        },
    );
    // The disk still needs a resync and none is under way: Critical.
    let vms: Value = serde_json::from_str(&server.cli_ok(&["vms", "--json"])).unwrap();
    assert_eq!(vms[0]["health"], "Critical", "{vms}");
    assert!(vms[0]["resync"].is_null(), "{vms}");
    // Logs stay refused (not recoverable) until a resync completes.
    let o = server.cli(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "db",
        "--disk",
        "d",
        "--hrl",
        l2.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("resync_required"));
    let o = agent_resync(&server, c, "db", &changed);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no_resync"));
    server.cli_ok(&["resync", "--vm", "db"]);
    // Agents killed at different points of the session; a rerun converges.
    let ch = changed.to_str().unwrap();
    interrupted(
        &server,
        &[
            "agent", "resync", "--creds", c, "--vm", "db", "--disk", "d", ch,
        ],
        &[20, 50, 80, 120, 160],
    );
    // A killed agent may already have committed the session; if not, a rerun does.
    let st: Value =
        serde_json::from_str(&server.cli_ok(&["resync", "--vm", "db", "--status", "--json"]))
            .unwrap();
    if st["state"] != "committed" {
        let o = agent_resync(&server, c, "db", &changed);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // A rerun after the commit is told the work is done (not `no_resync`) and sends nothing.
    let o = agent_resync(&server, c, "db", &changed);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again["state"], "committed", "{again}");
    assert_eq!(again["session"], st["id"], "{again}");
    assert_eq!(
        (
            again["blocks_compared"].as_u64(),
            again["bytes_uploaded"].as_u64()
        ),
        (Some(0), Some(0)),
        "{again}"
    );
    assert!(again["cycle"].as_u64().is_some(), "{again}");
    assert!(
        export(&server, "db", "latest", &dir.join("l2.raw")) == std::fs::read(&changed).unwrap()
    );
}

/// Runs the CLI with `args` and kills it after each of `delays_ms` (an agent interrupted at
/// different points of its work; a kill that lands after it finished is harmless).
fn interrupted(server: &Server, args: &[&str], delays_ms: &[u64]) {
    for &d in delays_ms {
        let mut child = std::process::Command::new(BIN)
            .args(args)
            .env("DRVAULT_DATA_DIR", &server.data_dir)
            .env("DRVAULT_BACKOFF_SCALE", "0.001")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(d));
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The first `len` bytes of a file: the data region of a fixed VHD.
fn head(path: &Path, len: u64) -> Vec<u8> {
    let mut b = std::fs::read(path).unwrap();
    b.truncate(len as usize);
    b
}

fn agent_failback(server: &Server, creds: &str, path: &Path, full: bool) -> std::process::Output {
    let mut args = vec![
        "agent", "failback", "--creds", creds, "--vm", "app", "--disk", "d", "--json",
    ];
    if full {
        args.push("--full");
    }
    args.push(path.to_str().unwrap());
    server.cli(&args)
}

#[test]
fn failback_downloads_only_what_the_failed_over_vm_changed_and_protection_resumes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some("[vault]\nblock_size = 1048576\n"));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let src = dir.join("src.raw");
    raw_image(&src, SIZE, &[(0, 20 * MIB as usize)], 5);
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        c,
        "--vm",
        "app",
        "--disk",
        &format!("{}:d", src.display()),
        "--generation",
        "1",
    ]);
    // Nothing to fail back before a failover; a drill is not a failover either.
    let o = agent_failback(&server, c, &src, false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_failed_over"));
    server.cli_ok(&["failover", "--vm", "app", "--kind", "test"]);
    let o = agent_failback(&server, c, &src, false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_failed_over"));
    server.cli_ok(&["failover", "cleanup", "--vm", "app"]);

    server.cli_ok(&["failover", "--vm", "app", "--kind", "unplanned"]);
    server.cli_ok(&["failover", "commit", "--vm", "app"]);
    let v: Value =
        serde_json::from_str(&server.cli_ok(&["failover", "show", "--vm", "app", "--json"]))
            .unwrap();
    let target = Path::new(v["record"]["output_dir"].as_str().unwrap()).join("d.vhd");
    assert_eq!(head(&target, SIZE), std::fs::read(&src).unwrap());

    // Committing the failback before any disk was synchronized is refused.
    let o = server.cli(&["failback", "commit", "--vm", "app"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("failback_not_synced"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The failed-over VM runs and writes to its disk (the VHD's data region).
    let changed = change(&target, 9);
    assert_ne!(head(&target, SIZE), std::fs::read(&src).unwrap());

    // Failback to the original disk downloads only the changed pieces.
    let o = agent_failback(&server, c, &src, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["blocks_compared"], 24, "{s}");
    let written = s["blocks_written"].as_u64().unwrap();
    assert!(written >= 10, "{s}");
    assert_eq!(s["blocks_differing"], written, "{s}");
    let down = s["bytes_downloaded"].as_u64().unwrap();
    assert!(
        down <= changed - MIB + 4096 * 8 + 64 * 9,
        "{down} bytes downloaded for {changed} changed"
    );
    assert_eq!(std::fs::read(&src).unwrap(), head(&target, SIZE));

    // The source disk is lost: --full rebuilds it at an alternate location as a fixed VHD that
    // qemu-img finds identical to the target.
    let alt = dir.join("alt.vhd");
    let o = agent_failback(&server, c, &alt, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["created"], true, "{s}");
    assert!(qemu_identical(&alt, "vpc", &target, "vpc"));
    // A rerun (say after an interruption) writes into the file it created.
    let o = agent_failback(&server, c, &alt, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["created"], false, "{s}");
    assert!(qemu_identical(&alt, "vpc", &target, "vpc"));
    // A --full download killed at different points, then rerun, converges too.
    let alt2 = dir.join("alt2.vhd");
    interrupted(
        &server,
        &[
            "agent",
            "failback",
            "--creds",
            c,
            "--vm",
            "app",
            "--disk",
            "d",
            "--full",
            alt2.to_str().unwrap(),
        ],
        &[20, 60, 100, 150],
    );
    let o = agent_failback(&server, c, &alt2, true);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(qemu_identical(&alt2, "vpc", &target, "vpc"));
    // Without --full a missing disk is an error, not a silent full download.
    let o = agent_failback(&server, c, &dir.join("missing.raw"), false);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--full"));

    // The VM writes again after the sync: the commit notices.
    write_at(&target, 2 * MIB, &[0xAB; 4096]);
    let o = server.cli(&["failback", "commit", "--vm", "app"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("target_changed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = agent_failback(&server, c, &src, false);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["blocks_written"], 1, "only the block written since: {s}");
    server.cli_ok(&["failback", "commit", "--vm", "app"]);

    // Protected again: the replica is the failed-back disk and the source's logs flow.
    assert_eq!(
        export(&server, "app", "latest", &dir.join("l.raw")),
        head(&target, SIZE)
    );
    let vms: Value = serde_json::from_str(&server.cli_ok(&["vms", "--json"])).unwrap();
    assert_eq!(vms[0]["state"], "protected", "{vms}");
    let next = dir.join("next.raw");
    std::fs::copy(&src, &next).unwrap();
    write_at(&next, 5 * MIB, &[7u8; 8192]);
    let log = dir.join("after.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        src.to_str().unwrap(),
        next.to_str().unwrap(),
        "-o",
        log.to_str().unwrap(),
    ]);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        c,
        "--vm",
        "app",
        "--disk",
        "d",
        "--hrl",
        log.to_str().unwrap(),
    ]);
    assert_eq!(
        export(&server, "app", "latest", &dir.join("n.raw")),
        std::fs::read(&next).unwrap()
    );
    let jobs: Value =
        serde_json::from_str(&server.cli_ok(&["jobs", "--vm", "app", "--json"])).unwrap();
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "failback" && j["state"] == "succeeded"),
        "{jobs}"
    );
}
