//! The operator's monitoring: the Prometheus alert rules in config/prometheus/ (checked and
//! unit-tested by promtool) and the Grafana dashboard in config/grafana/, whose every query must
//! name a metric a real server exports.

use crate::common::*;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use drvault::wire::{DiskBacklog, Heartbeat, VmReport};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo().join("config/prometheus");
    let check = std::process::Command::new("promtool")
        .args(["check", "rules", "drvault.rules.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    let out = succeeded(&check, "promtool check rules");
    assert!(out.contains("SUCCESS"), "{out}");
    let test = std::process::Command::new("promtool")
        .args(["test", "rules", "drvault.rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    succeeded(&test, "promtool test rules");
    // Every alert of the rules file has a test that fires it.
    let rules = std::fs::read_to_string(dir.join("drvault.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("drvault.rules.test.yml")).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!(
                    "alertname: {name}\n        exp_alerts:\n          - "
                )),
                "alert {name} has no promtool test that fires it"
            );
        }
    }
}

/// The `drvault_*` metric names a PromQL expression reads (histogram series named by their
/// family).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("drvault_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(family.to_string());
        rest = &tail[end..];
    }
    out
}

/// The metric families a Prometheus text exposition holds.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_and_alert_rule_names_a_metric_the_server_exports() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("config/grafana/drvault-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut wanted = BTreeSet::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard of {} panels", panels.len());
    for p in panels {
        let targets = p["targets"].as_array().expect("every panel queries");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let names = metric_names(t["expr"].as_str().expect("expr"));
            assert!(
                !names.is_empty(),
                "panel {} queries no drvault metric",
                p["title"]
            );
            wanted.extend(names);
        }
    }
    let rules =
        std::fs::read_to_string(repo().join("config/prometheus/drvault.rules.yml")).unwrap();
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr: ") {
            wanted.extend(metric_names(expr));
        }
    }

    // A server with a protected VM, a heartbeating host, a verify and a collection behind it:
    // what an estate's server exports.
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), None);
    let creds = server.add_host("hv", None);
    let host = server.client_with(&Server::host_token(&creds));
    let disk = t.path().join("os.raw");
    raw_image(&disk, MIB, &[(0, 4096)], 1);
    server.protect(&creds, "web", &format!("{}:os", disk.display()), &[]);
    host.heartbeat(&Heartbeat {
        agent_version: "9.9.9-test".into(),
        interval_s: 30,
        vms: vec![VmReport {
            vm: "web".into(),
            replicating: true,
            disks: vec![DiskBacklog {
                disk: "os".into(),
                backlog_bytes: 0,
                pending_logs: 0,
                oldest_pending_unix: None,
            }],
            last_error: None,
            last_cycle_unix: None,
        }],
    })
    .await
    .unwrap();
    server.cli_ok(&["verify"]);
    server.cli_ok(&["gc"]);
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("{}/metrics", server.url);
    // RPO appears once the VM's first point exists (initial replication is one).
    let text = eventually_async(Duration::from_secs(60), "metrics of the VM", || async {
        let text = http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        text.contains("drvault_vm_rpo_seconds{")
            .then_some(text.clone())
            .ok_or("no drvault_vm_rpo_seconds yet".to_string())
    })
    .await;
    let have = exported(&text);
    let missing: Vec<_> = wanted.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\n(exported: {have:?})"
    );
}
