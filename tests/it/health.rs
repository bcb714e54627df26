//! Heartbeats and health: what the server knows of every host and VM.
//!
//! The tests drive `POST /v1/agent/heartbeat` with the typed client, as a host agent would, and
//! read health through the API and the real CLI (`drvault vms`, `drvault host list`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common;
use common::*;
use drvault::client::{Client, ClientError};
use drvault::format::hrl::Guid;
use drvault::wire::{
    AgentFault, DiskBacklog, Health, Heartbeat, HeartbeatAck, PolicyChange, VmReport, VmView,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// 64 KiB blocks; "not reporting" is Critical after 10 heartbeat intervals, with a floor of 4 s
/// instead of 15 min so the test agent's 1 s heartbeats reach it quickly.
const CONFIG: &str = "[vault]\nblock_size = 65536\n[health]\nnot_reporting_critical_floor_s = 4\n";

fn guid(n: u8) -> Guid {
    Guid([n; 16])
}

/// A server with host `hv` protecting VM `vm` (one 1 MiB raw disk `os`, policy options
/// `extra` for `agent protect`), and the host's API client.
fn protected(dir: &Path, config: &str, vm: &str, extra: &[&str]) -> (Server, Client, PathBuf) {
    let server = Server::start(dir, Some(config));
    let creds = server.add_host("hv", None);
    let host = server.client_with(&Server::host_token(&creds));
    let disk = dir.join("os.raw");
    raw_image(&disk, MIB, &[(0, 4096)], 1);
    let mut args = vec![
        "agent".to_string(),
        "protect".into(),
        "--creds".into(),
        creds.display().to_string(),
        "--vm".into(),
        vm.into(),
        "--disk".into(),
        format!("{}:os", disk.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    server.cli_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    (server, host, disk)
}

/// A heartbeat reporting `vm` with disk `os` holding `backlog` unsent bytes.
fn beat(interval_s: u64, vm: &str, backlog: u64, error: Option<AgentFault>) -> Heartbeat {
    Heartbeat {
        agent_version: "9.9.9-test".into(),
        interval_s,
        vms: vec![VmReport {
            vm: vm.into(),
            replicating: error.as_ref().is_none_or(|e| e.recoverable),
            disks: vec![DiskBacklog {
                disk: "os".into(),
                backlog_bytes: backlog,
                pending_logs: u64::from(backlog > 0),
                oldest_pending_unix: None,
            }],
            last_error: error,
            last_cycle_unix: None,
        }],
    }
}

fn codes(v: &VmView) -> Vec<String> {
    v.health_findings.iter().map(|f| f.code.clone()).collect()
}

/// Polls the VM view until `want` holds (deadline generous for a loaded machine).
async fn wait_view(op: &Client, vm: &str, what: &str, want: impl Fn(&VmView) -> bool) -> VmView {
    eventually_async(Duration::from_secs(60), what, || async {
        let v = op.vm(vm).await.map_err(|e| e.to_string())?;
        if want(&v) {
            Ok(v)
        } else {
            Err(format!("{:?} {:?}", v.health, v.health_reasons))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_goes_warning_then_critical_and_back_to_normal_when_it_reports() {
    let t = tempfile::tempdir().unwrap();
    let (server, host, _) = protected(t.path(), CONFIG, "web", &[]);
    let op = server.operator();
    let before = op.vm("web").await.unwrap();
    assert_eq!(before.health, Health::Normal, "{:?}", before.health_reasons);
    assert!(before.agent.is_none(), "a host driven by hand has no agent");
    let ack: HeartbeatAck = host.heartbeat(&beat(1, "web", 0, None)).await.unwrap();
    let d = &ack.vms[0];
    assert_eq!(d.vm, "web");
    assert_eq!(d.state, Some(drvault::wire::VmState::Protected));
    assert_eq!(d.policy.as_ref().map(|p| p.interval_s), Some(300));
    assert!(d.resync.is_none() && ack.throttle_mb_s.is_none());
    let v = op.vm("web").await.unwrap();
    let a = v.agent.as_ref().expect("the agent's report is shown");
    assert_eq!(
        (a.host.as_str(), a.agent_version.as_str()),
        ("hv", "9.9.9-test")
    );
    // The agent stops: 2 intervals of silence are a Warning, 10 (floor 4 s) Critical.
    let late = wait_view(&op, "web", "host late", |v| {
        v.health == Health::Warning && codes(v) == ["host_late"]
    })
    .await;
    assert!(late.health_reasons[0].contains("host hv"), "{late:?}");
    let silent = wait_view(&op, "web", "host not reporting", |v| {
        v.health == Health::Critical && codes(v) == ["host_not_reporting"]
    })
    .await;
    assert!(
        silent.health_reasons[0].contains("not reporting"),
        "{:?}",
        silent.health_reasons
    );
    let vms = server.cli_ok(&["vms"]);
    assert!(
        vms.contains("Critical") && vms.contains("host_not_reporting"),
        "{vms}"
    );
    let hosts = server.cli_ok(&["host", "list"]);
    assert!(
        hosts.contains("9.9.9-test") && hosts.contains("s ago"),
        "{hosts}"
    );
    let metrics = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for m in [
        "drvault_host_last_contact_seconds{host=\"hv\"}",
        "drvault_vm_backlog_bytes{vm=\"web\"}",
    ] {
        assert!(metrics.contains(m), "/metrics lacks {m}");
    }
    // It reports again: Normal at once (each try sends a fresh heartbeat, so a slow machine
    // cannot turn the check late).
    eventually_async(Duration::from_secs(60), "Normal again", || async {
        host.heartbeat(&beat(1, "web", 0, None))
            .await
            .map_err(|e| e.to_string())?;
        let v = op.vm("web").await.map_err(|e| e.to_string())?;
        (v.health == Health::Normal)
            .then_some(())
            .ok_or(format!("{:?}", v.health_reasons))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_recoverable_agent_error_makes_the_vm_critical_with_its_code() {
    let t = tempfile::tempdir().unwrap();
    let (server, host, _) = protected(t.path(), CONFIG, "web", &[]);
    let op = server.operator();
    let fault = AgentFault {
        code: "failed_over".into(),
        message: "VM web was failed over and the failover committed".into(),
        recoverable: false,
        at_unix: 1_800_000_000,
    };
    // Long heartbeat interval: silence plays no part here.
    host.heartbeat(&beat(600, "web", 0, Some(fault.clone())))
        .await
        .unwrap();
    let v = op.vm("web").await.unwrap();
    assert_eq!(v.health, Health::Critical, "{:?}", v.health_reasons);
    assert_eq!(codes(&v), ["failed_over"]);
    assert!(v.health_reasons[0].contains("committed"), "{v:?}");
    let a = v.agent.unwrap();
    assert!(!a.replicating);
    assert_eq!(a.last_error, Some(fault));
    let vms = server.cli_ok(&["vms", "web"]);
    assert!(
        vms.contains("failed_over") && vms.contains("not recoverable"),
        "{vms}"
    );
    let hosts = server.cli_ok(&["host", "list"]);
    assert!(hosts.contains("web: failed_over"), "{hosts}");
    // The next clean report clears it.
    host.heartbeat(&beat(600, "web", 0, None)).await.unwrap();
    let v = op.vm("web").await.unwrap();
    assert_eq!(v.health, Health::Normal, "{:?}", v.health_reasons);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_past_half_the_disk_requires_a_resync_and_schedules_a_session() {
    let t = tempfile::tempdir().unwrap();
    let (server, host, _) = protected(t.path(), CONFIG, "web", &[]);
    let op = server.operator();
    // Under half of the 1 MiB disk: nothing happens.
    let ack = host
        .heartbeat(&beat(600, "web", 500 * KIB, None))
        .await
        .unwrap();
    assert!(ack.vms[0].resync.is_none());
    let v = op.vm("web").await.unwrap();
    assert!(
        v.disks[0].resync_required.is_none() && v.resync.is_none(),
        "{v:?}"
    );
    // Half of it: the disk needs a resync, a session opens, and the answer tells the agent.
    let ack = host
        .heartbeat(&beat(600, "web", 512 * KIB, None))
        .await
        .unwrap();
    let brief = ack.vms[0]
        .resync
        .as_ref()
        .expect("the session is in the answer");
    assert!(
        ["scheduled", "active"].contains(&brief.state.as_str()),
        "{brief:?}"
    );
    assert_eq!(brief.disks, ["os"]);
    let v = op.vm("web").await.unwrap();
    let why = v.disks[0].resync_required.as_deref().unwrap();
    assert!(why.contains("backlog") && why.contains("50%"), "{why}");
    assert_eq!(v.resync.as_ref().map(|r| &r.session), Some(&brief.session));
    assert!(codes(&v).contains(&"resync_under_way".to_string()), "{v:?}");
    // Logs wait for it.
    let log = make_log(&[(0, vec![5u8; 4096])], guid(1), Guid::NIL);
    let (status, code, _) = refused(send_log(&host, "web", "os", &log, guid(1), Some(1)).await);
    assert_eq!(
        (status.as_u16(), code.as_str()),
        (409, "resync_in_progress")
    );
    // The next heartbeat still names the same session; no second one opens.
    let again = host
        .heartbeat(&beat(600, "web", 700 * KIB, None))
        .await
        .unwrap();
    assert_eq!(
        again.vms[0].resync.as_ref().map(|r| &r.session),
        Some(&brief.session)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retention_with_heavy_rewrites_stays_normal() {
    let t = tempfile::tempdir().unwrap();
    let (server, host, _) = protected(t.path(), CONFIG, "web", &["--retention", "7d"]);
    let op = server.operator();
    // Eight cycles each rewriting the same 256 KiB hot set: 2 MiB of logs kept on a 1 MiB disk,
    // all within the 7-day retention; the host sends every log at once (no backlog).
    let mut prev = Guid::NIL;
    for n in 1..=8u8 {
        let log = make_log(
            &[(0, pseudo_random(256 * KIB as usize, n as u64))],
            guid(n),
            prev,
        );
        let ack = send_log(&host, "web", "os", &log, guid(n), Some(n as u64))
            .await
            .unwrap();
        assert!(ack["resync_required"].is_null(), "cycle {n}: {ack}");
        prev = guid(n);
        host.heartbeat(&beat(600, "web", 0, None)).await.unwrap();
    }
    let v = op.vm("web").await.unwrap();
    assert_eq!(v.health, Health::Normal, "{:?}", v.health_reasons);
    let d = &v.disks[0];
    assert_eq!(d.journal_length, 8);
    assert!(d.pending_log_bytes > MIB, "{}", d.pending_log_bytes);
    assert!(d.resync_required.is_none() && v.resync.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_naming_another_hosts_vm_is_refused_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (server, host, _) = protected(t.path(), CONFIG, "web", &[]);
    let op = server.operator();
    host.heartbeat(&beat(600, "web", 0, None)).await.unwrap();
    let before = op.vm("web").await.unwrap();
    let other = server.client_with(&Server::host_token(&server.add_host("hv2", None)));
    let fault = AgentFault {
        code: "failed_over".into(),
        message: "not yours".into(),
        recoverable: false,
        at_unix: 1,
    };
    let mut hb = beat(1, "new", 0, None);
    hb.vms.extend(beat(1, "web", 900 * KIB, Some(fault)).vms);
    match other.heartbeat(&hb).await {
        Err(ClientError::Api { status, body, .. }) => {
            assert_eq!(
                (status.as_u16(), body.code.as_str()),
                (403, "forbidden"),
                "{body:?}"
            );
            assert!(body.message.contains("another host"), "{body:?}");
        }
        r => panic!("expected 403, got {r:?}"),
    }
    let after = op.vm("web").await.unwrap();
    assert_eq!(after.health, Health::Normal, "{:?}", after.health_reasons);
    assert_eq!(after.agent.as_ref().map(|a| a.host.as_str()), Some("hv"));
    assert_eq!(after.agent.as_ref().map(|a| a.backlog_bytes), Some(0));
    assert!(after.agent.unwrap().last_error.is_none());
    assert!(after.disks[0].resync_required.is_none() && after.resync.is_none());
    assert_eq!(before.health_findings, after.health_findings);
    let hosts = op.hosts().await.unwrap();
    let hv2 = hosts.iter().find(|h| h.name == "hv2").unwrap();
    assert!(hv2.last_contact.is_none(), "nothing recorded: {hv2:?}");
    // Alone, the VM it does not know yet is fine: the agent is told it is not protected.
    let ack = other.heartbeat(&beat(1, "new", 0, None)).await.unwrap();
    assert_eq!((ack.vms[0].vm.as_str(), ack.vms[0].state), ("new", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_throttle_reaches_the_agent_and_shows_in_host_list() {
    let t = tempfile::tempdir().unwrap();
    let (server, host, _) = protected(t.path(), CONFIG, "web", &[]);
    let out = server.cli_ok(&["host", "throttle", "hv", "--mb-s", "20"]);
    assert!(out.contains("20 MB/s"), "{out}");
    let ack = host.heartbeat(&beat(600, "web", 0, None)).await.unwrap();
    assert_eq!(ack.throttle_mb_s, Some(20.0));
    let hosts = server.cli_ok(&["host", "list", "--json"]);
    assert!(hosts.contains("\"throttle_mb_s\": 20.0"), "{hosts}");
    let bad = server.cli(&["host", "throttle", "hv", "--mb-s", "-3"]);
    assert!(!bad.status.success());
    server.cli_ok(&["host", "throttle", "hv", "--mb-s", "none"]);
    let ack = host.heartbeat(&beat(600, "web", 0, None)).await.unwrap();
    assert_eq!(ack.throttle_mb_s, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_interval_of_one_second_is_accepted_and_zero_refused() {
    let t = tempfile::tempdir().unwrap();
    let (server, _host, _) = protected(t.path(), CONFIG, "web", &["--interval", "1"]);
    let op = server.operator();
    assert_eq!(op.vm("web").await.unwrap().policy.interval_s, 1);
    let zero = PolicyChange {
        interval_s: Some(0),
        ..Default::default()
    };
    match op.set_policy("web", &zero).await {
        Err(ClientError::Api { status, body, .. }) => {
            assert_eq!(
                (status.as_u16(), body.code.as_str()),
                (400, "invalid_policy")
            );
            assert!(body.message.contains("from 1 s"), "{body:?}");
        }
        r => panic!("expected 400, got {r:?}"),
    }
    assert_eq!(op.vm("web").await.unwrap().policy.interval_s, 1);
    let five = PolicyChange {
        interval_s: Some(5),
        ..Default::default()
    };
    assert_eq!(
        op.set_policy("web", &five).await.unwrap().policy.interval_s,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_expiry_folds_old_logs_into_the_replica_and_the_points_list_shrinks() {
    let t = tempfile::tempdir().unwrap();
    let config = format!("{CONFIG}[replica]\nmerge_interval_s = 1\n");
    let (server, host, disk) = protected(
        t.path(),
        &config,
        "web",
        &["--interval", "1", "--retention", "10s"],
    );
    let op = server.operator();
    let mut prev = Guid::NIL;
    for n in 1..=3u8 {
        let data = pseudo_random(8 * KIB as usize, 100 + n as u64);
        let offset = n as u64 * 64 * KIB;
        write_at(&disk, offset, &data);
        let log = make_log(&[(offset, data)], guid(n), prev);
        send_log(&host, "web", "os", &log, guid(n), Some(n as u64))
            .await
            .unwrap();
        prev = guid(n);
    }
    let ids = |p: &[drvault::wire::PointView]| p.iter().map(|p| p.id.clone()).collect::<Vec<_>>();
    let all = op.points("web").await.unwrap();
    assert_eq!(ids(&all), ["c0", "c1", "c2", "c3"]);
    // Once the logs are older than the 10 s retention, the background merge folds them in.
    let left = eventually_async(
        Duration::from_secs(90),
        "points past retention merged",
        || async {
            let p = op.points("web").await.map_err(|e| e.to_string())?;
            (p.len() == 1)
                .then_some(p.clone())
                .ok_or(format!("{:?}", ids(&p)))
        },
    )
    .await;
    assert_eq!(
        ids(&left),
        ["c3"],
        "the newest point remains, as the replica's base"
    );
    let v = op.vm("web").await.unwrap();
    assert_eq!(v.disks[0].journal_length, 0);
    let out = t.path().join("latest.raw");
    succeeded(&server.export("web", "os", "latest", "raw", &out), "export");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&disk).unwrap(),
        "the merged replica holds every write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_still_knows_when_each_host_last_reported() {
    let t = tempfile::tempdir().unwrap();
    let (mut server, host, _) = protected(t.path(), CONFIG, "web", &[]);
    host.heartbeat(&beat(600, "web", 3 * KIB, None))
        .await
        .unwrap();
    let before = server.operator().vm("web").await.unwrap().agent.unwrap();
    // Saved within a few seconds; then even a crash keeps it.
    eventually(
        Duration::from_secs(60),
        "the contact record is saved",
        || {
            // A whole version, not the staging file of a write still under way.
            let saved = server.vault_objects("records/contact");
            saved
                .iter()
                .any(|k| k.contains("/v") && !k.contains('#'))
                .then_some(())
                .ok_or(format!("{saved:?}"))
        },
    );
    server.kill9();
    server.restart();
    let after = server.operator().vm("web").await.unwrap().agent.unwrap();
    assert_eq!(
        (
            &after.last_contact,
            after.backlog_bytes,
            &after.agent_version
        ),
        (&before.last_contact, 3 * KIB, &before.agent_version)
    );
    // A clean stop saves the last report at once.
    let host = server.client_with(&Server::host_token(&t.path().join("hv.creds.json")));
    let mut hb = beat(600, "web", 0, None);
    hb.agent_version = "9.9.10-test".into();
    host.heartbeat(&hb).await.unwrap();
    assert!(server.stop().success());
    server.restart();
    let after = server.operator().vm("web").await.unwrap().agent.unwrap();
    assert_eq!(
        (after.agent_version.as_str(), after.backlog_bytes),
        ("9.9.10-test", 0)
    );
}
