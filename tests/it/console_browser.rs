//! The operator console in a real browser: headless Debian Chromium driven by playwright-core
//! (`tests/browser/console.mjs`) against a real server with a protected VM. The script logs in
//! (after a wrong token is refused), reads the VM's health, opens its page, starts a test
//! failover through the confirmation dialog, watches the job succeed in the Jobs view, cleans the
//! drill up, runs a recovery plan that pauses and resumes it, shows hosts and providers, the
//! verify run that found a missing chunk with the point it damaged, failback state and the audit
//! log, checks that actions not allowed are disabled with their reason (by state, and by role
//! for a viewer session), runs axe-core on every view, plots throughput, checks both viewports
//! for horizontal overflow and keyboard reach, and saves screenshots in
//! `target/console-artifacts/` (or `$DRVAULT_ARTIFACTS`).
//!
//! Needs `/usr/bin/chromium` (or `$CHROMIUM`), `node`, `node_modules/playwright-core` and
//! `node_modules/axe-core` (`npm ci`); `.ci/run` installs them. Without them the test fails when `CI` is set and
//! is skipped with a notice otherwise.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// 1 MiB blocks and the shared test networks (fixtures/networks.toml).
const NETWORKS: &str = concat!(
    "[vault]\nblock_size = 1048576\n\n",
    include_str!("../../fixtures/networks.toml")
);

/// What is missing to run the browser, if anything.
fn missing_tools(repo: &Path, chromium: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !chromium.exists() {
        missing.push(format!("{} (apt-get install chromium)", chromium.display()));
    }
    if Command::new("node").arg("--version").output().is_err() {
        missing.push("node".into());
    }
    if !repo
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push("node_modules/playwright-core (npm ci)".into());
    }
    if !repo.join("node_modules/axe-core/axe.min.js").exists() {
        missing.push("node_modules/axe-core (npm ci)".into());
    }
    missing
}

#[test]
fn console_drives_a_test_failover_in_headless_chromium() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let missing = missing_tools(&repo, &chromium);
    if !missing.is_empty() {
        let msg = format!(
            "console browser test needs {}; `bash .ci/run` installs them",
            missing.join(", ")
        );
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }

    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some(NETWORKS));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let img = dir.join("web.raw");
    raw_image(
        &img,
        3 * 1024 * 1024,
        &[(0, 200_000), (2 << 20, 70_000)],
        21,
    );
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        c,
        "--vm",
        "web01",
        "--disk",
        &format!("{}:os", img.display()),
        "--generation",
        "1",
        "--cpus",
        "1",
        "--memory-mib",
        "256",
        "--nic",
        "network=corp,mac=00:15:5d:00:00:31,ip=10.20.1.40",
    ]);
    // One app-consistent cycle, so the timeline has both kinds of point.
    let img2 = dir.join("web2.raw");
    std::fs::copy(&img, &img2).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img2).unwrap();
        f.write_all_at(&pseudo_random(4096, 99), 1 << 20).unwrap();
    }
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
        "web01",
        "--disk",
        "os",
        "--hrl",
        log.to_str().unwrap(),
        "--cycle",
        "1",
        "--app-consistent",
    ]);

    // What the other views show: a provider, a plan pausing before its one group, and a second
    // VM whose chunk went missing, found by a verify run.
    server.cli_ok(&["provider", "add", "vmm01", "--cloud", "prod"]);
    server.cli_ok(&[
        "plan", "create", "web-tier", "--group", "web01", "--pause", "1",
    ]);
    let chunks_before = server.vault_objects("chunks");
    let db = dir.join("db.raw");
    raw_image(&db, 2 * 1024 * 1024, &[(0, 300_000)], 77);
    server.protect(&creds, "db01", &format!("{}:os", db.display()), &[]);
    let lost = server
        .vault_objects("chunks")
        .into_iter()
        .find(|k| !chunks_before.contains(k))
        .expect("db01 stored a chunk of its own");
    std::fs::remove_file(server.data_dir.join("vault").join(&lost)).unwrap();
    let verify = server.cli(&["verify"]);
    assert_eq!(
        verify.status.code(),
        Some(7),
        "verify reports the damage (exit code 7): {}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // A viewer account: its session sees the actions it may not run disabled, with the reason.
    let viewer_file = dir.join("auditor.token");
    server.cli_ok(&[
        "account",
        "add",
        "auditor",
        "--role",
        "viewer",
        "-o",
        viewer_file.to_str().unwrap(),
    ]);
    let viewer_token = std::fs::read_to_string(&viewer_file).unwrap();

    let artifacts = std::env::var_os("DRVAULT_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target/console-artifacts"));
    let out = Command::new("node")
        .arg(repo.join("tests/browser/console.mjs"))
        .current_dir(&repo)
        .env("DRVAULT_URL", &server.url)
        .env("DRVAULT_TOKEN", &server.token)
        .env("DRVAULT_VIEWER_TOKEN", viewer_token.trim())
        .env("DRVAULT_VM", "web01")
        .env("DRVAULT_HOST", "hv")
        .env("DRVAULT_PROVIDER", "vmm01")
        .env("DRVAULT_PLAN", "web-tier")
        .env("DRVAULT_DAMAGED_VM", "db01")
        .env("DRVAULT_ARTIFACTS", &artifacts)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "console.mjs failed ({}); screenshots in {}\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log tail:\n{}",
        out.status,
        artifacts.display(),
        tail(&server.log(), 40)
    );
    println!("{stdout}");

    // What the page did, as the server saw it: the plan's drill (the latest), run and cleaned up
    // successfully, and the plan's run resumed to success.
    let v: Value =
        serde_json::from_str(&server.cli_ok(&["failover", "show", "--vm", "web01", "--json"]))
            .unwrap();
    assert_eq!(v["record"]["kind"], "test");
    assert_eq!(v["record"]["point"], "c1", "the point the dialog named");
    assert_eq!(v["record"]["state"], "cleaned_up");
    assert_eq!(v["record"]["drill_successful"], true);
    let jobs: Value = serde_json::from_str(&server.cli_ok(&["jobs", "--json"])).unwrap();
    let plan_runs: Vec<&Value> = jobs
        .as_array()
        .expect("a job list")
        .iter()
        .filter(|j| j["kind"] == "recovery_plan")
        .collect();
    assert_eq!(plan_runs.len(), 1, "one plan run: {plan_runs:?}");
    assert_eq!(plan_runs[0]["state"], "succeeded");
    for shot in [
        "vms-1280.png",
        "vm-1280.png",
        "jobs-1280.png",
        "vm-390.png",
        "plans-1280.png",
        "hosts-1280.png",
        "verify-1280.png",
        "failback-1280.png",
        "audit-1280.png",
        "vm-viewer-1280.png",
    ] {
        let p = artifacts.join(shot);
        assert!(
            std::fs::metadata(&p)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
            "screenshot {} missing",
            p.display()
        );
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
