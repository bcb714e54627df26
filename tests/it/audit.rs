//! audit tests (issue 21): every operator action leaves exactly one audit entry with its actor,
//! action, target and result; refused requests are recorded as refused; an edited, removed or
//! swapped entry in the vault directory is reported by verify; bad queries get clear errors.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use drvault::client::{Client, ClientError};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const CONFIG: &str = "[vault]\nblock_size = 1048576\n\n[resync]\nwindow = \"\"\n";

/// Every entry the server has stored, oldest first (all of them: the tests make few).
async fn entries(c: &Client) -> Vec<Value> {
    let list: Value = c.get_json("/v1/audit?limit=1000").await.unwrap();
    list["entries"].as_array().unwrap().clone()
}

fn last_seq(all: &[Value]) -> u64 {
    all.last().map(|e| e["seq"].as_u64().unwrap()).unwrap_or(0)
}

/// What the caller saw of a request.
#[derive(Debug)]
struct Seen {
    status: Option<u16>,
    code: Option<String>,
    job: Option<String>,
}

async fn call(c: &Client, method: Method, path: &str, body: Option<Value>) -> Seen {
    let r: Result<Value, ClientError> = if method == Method::DELETE {
        c.delete(path).await.map(|()| Value::Null)
    } else {
        c.send_json(method, path, &body.unwrap_or(json!({}))).await
    };
    match r {
        Ok(v) => Seen {
            status: None,
            code: None,
            job: v.get("job").and_then(|j| j.as_str()).map(String::from),
        },
        Err(ClientError::Api { status, body, .. }) => Seen {
            status: Some(status.as_u16()),
            code: Some(body.code),
            job: None,
        },
        Err(e) => panic!("{path}: {e}"),
    }
}

async fn wait_final(c: &Client, job: &str) {
    eventually_async(
        Duration::from_secs(120),
        &format!("job {job} ends"),
        || async {
            let j = c.job(job).await.map_err(|e| e.to_string())?;
            if j.state.is_final() {
                Ok(())
            } else {
                Err(format!("{:?}", j.state))
            }
        },
    )
    .await
}

/// The one entry a request added, checked against what its caller saw.
fn check_one(after: &[Value], before: u64, actor: &str, action: &str, target: &str, seen: &Seen) {
    let new: Vec<&Value> = after
        .iter()
        .filter(|e| e["seq"].as_u64().unwrap() > before)
        .collect();
    assert_eq!(new.len(), 1, "{action} on {target}: entries {new:?}");
    let e = new[0];
    assert_eq!(e["actor"], actor, "{e}");
    assert_eq!(e["action"], action, "{e}");
    assert_eq!(e["target"], target, "{e}");
    assert_eq!(e["from"], "127.0.0.1", "{e}");
    match seen.status {
        None => {
            assert_eq!(e["result"], "ok", "{e}");
            assert!(e["status"].as_u64().unwrap() < 300, "{e}");
            assert_eq!(e["code"], Value::Null, "{e}");
            assert_eq!(e["job"].as_str(), seen.job.as_deref(), "{e}");
        }
        Some(status) => {
            assert_eq!(e["result"], "error", "{e}");
            assert_eq!(e["status"], status, "{e}");
            assert_eq!(e["code"].as_str(), seen.code.as_deref(), "{e}");
            assert_eq!(e["job"], Value::Null, "{e}");
        }
    }
    assert_eq!(e["hash"].as_str().unwrap().len(), 64, "{e}");
}

fn small_vm(dir: &Path) -> PathBuf {
    let img = dir.join("web01.raw");
    raw_image(&img, 2 * MIB, &[(0, 64 * 1024)], 21);
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_action_leaves_exactly_one_entry() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let op = server.operator();

    // Through the CLI: registering a host (admin) and protecting a VM (the host's agent).
    let creds = server.add_host("hv01", None);
    let img = small_vm(t.path());
    server.protect(&creds, "web01", &format!("{}:os", img.display()), &[]);
    let all = entries(&op).await;
    let first: Vec<(&str, &str, &str, &str)> = all
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
                e["target"].as_str().unwrap(),
                e["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        first,
        [
            ("admin", "host.add", "host/hv01", "ok"),
            ("host/hv01", "vm.protect", "vm/web01", "ok"),
        ],
        "{all:?}"
    );
    assert_eq!(all[0]["seq"], 1);
    assert_eq!(all[1]["prev"], all[0]["hash"]);

    let vm = "/v1/vms/web01";
    let steps: Vec<(Method, String, Option<Value>, &str, &str)> = vec![
        (
            Method::POST,
            "/v1/hosts".into(),
            Some(json!({"name": "hv02"})),
            "host.add",
            "host/hv02",
        ),
        (
            Method::PUT,
            "/v1/hosts/hv02/throttle".into(),
            Some(json!({"mb_s": 10.0})),
            "host.throttle",
            "host/hv02",
        ),
        (
            Method::POST,
            "/v1/hosts/hv02/token".into(),
            None,
            "host.rotate_token",
            "host/hv02",
        ),
        (
            Method::POST,
            "/v1/accounts".into(),
            Some(json!({"name": "ann", "role": "operator"})),
            "account.add",
            "account/ann",
        ),
        (
            Method::POST,
            "/v1/accounts/ann/token".into(),
            Some(json!({})),
            "account.rotate_token",
            "account/ann",
        ),
        (
            Method::DELETE,
            "/v1/accounts/ann".into(),
            None,
            "account.remove",
            "account/ann",
        ),
        (
            Method::DELETE,
            "/v1/hosts/hv02".into(),
            None,
            "host.remove",
            "host/hv02",
        ),
        (
            Method::POST,
            "/v1/providers".into(),
            Some(json!({"name": "vmm01", "cloud": "prod"})),
            "provider.add",
            "provider/vmm01",
        ),
        (
            Method::DELETE,
            "/v1/providers/vmm01".into(),
            None,
            "provider.remove",
            "provider/vmm01",
        ),
        (
            Method::PATCH,
            vm.into(),
            Some(json!({"interval_s": 300})),
            "vm.policy",
            "vm/web01",
        ),
        (
            Method::PUT,
            format!("{vm}/nics/0"),
            Some(json!({"skip": true})),
            "vm.nic.set",
            "vm/web01/nic/0",
        ),
        (
            Method::DELETE,
            format!("{vm}/nics/0"),
            None,
            "vm.nic.clear",
            "vm/web01/nic/0",
        ),
        (
            Method::POST,
            format!("{vm}/merge"),
            Some(json!({"all": true})),
            "vm.merge",
            "vm/web01",
        ),
        (
            Method::POST,
            "/v1/plans".into(),
            Some(json!({"name": "shop", "groups": [{"vms": ["web01"]}]})),
            "plan.create",
            "plan/shop",
        ),
        (
            Method::POST,
            format!("{vm}/failover"),
            Some(json!({"kind": "test"})),
            "failover.test",
            "vm/web01",
        ),
        (
            Method::POST,
            format!("{vm}/failover/cleanup"),
            None,
            "failover.cleanup",
            "vm/web01",
        ),
        (
            Method::POST,
            "/v1/plans/shop/failover".into(),
            Some(json!({"kind": "test"})),
            "plan.failover.test",
            "plan/shop",
        ),
        (
            Method::POST,
            format!("{vm}/failover/cleanup"),
            None,
            "failover.cleanup",
            "vm/web01",
        ),
        (
            Method::POST,
            "/v1/jobs/00000000-0000-4000-8000-000000000000/resume".into(),
            None,
            "job.resume",
            "job/00000000-0000-4000-8000-000000000000",
        ),
        (
            Method::POST,
            format!("{vm}/resync"),
            Some(json!({"now": true})),
            "resync.start",
            "vm/web01",
        ),
        (
            Method::POST,
            format!("{vm}/resync/cancel"),
            None,
            "resync.cancel",
            "vm/web01",
        ),
        (
            Method::POST,
            format!("{vm}/failover"),
            Some(json!({"kind": "planned", "wait_s": 600})),
            "failover.planned",
            "vm/web01",
        ),
        (
            Method::POST,
            format!("{vm}/failover/cancel"),
            None,
            "failover.cancel",
            "vm/web01",
        ),
        (
            Method::POST,
            format!("{vm}/failover"),
            Some(json!({"kind": "unplanned"})),
            "failover.unplanned",
            "vm/web01",
        ),
        (
            Method::POST,
            format!("{vm}/failover/commit"),
            None,
            "failover.commit",
            "vm/web01",
        ),
        (
            Method::POST,
            format!("{vm}/failback/commit"),
            None,
            "failback.commit",
            "vm/web01",
        ),
        (
            Method::POST,
            "/v1/verify".into(),
            Some(json!({})),
            "verify",
            "vault",
        ),
        (
            Method::POST,
            "/v1/gc".into(),
            Some(json!({"dry_run": true})),
            "gc.dry_run",
            "vault",
        ),
        (
            Method::POST,
            "/v1/gc".into(),
            Some(json!({})),
            "gc",
            "vault",
        ),
        (
            Method::POST,
            "/v1/keys/rotate".into(),
            None,
            "key.rotate",
            "vault",
        ),
        (
            Method::POST,
            format!("{vm}/disable"),
            Some(json!({})),
            "vm.disable",
            "vm/web01",
        ),
    ];
    // Jobs that end by themselves are waited for, so the next action does not meet them
    // running; the planned failover's waits for final logs until it is cancelled.
    let ends_alone = [
        "failover.test",
        "plan.failover.test",
        "failover.unplanned",
        "verify",
        "gc.dry_run",
        "gc",
    ];
    let mut planned_job = None;
    let mut oks = 0;
    for (method, path, body, action, target) in steps {
        let before = last_seq(&entries(&op).await);
        let seen = call(&op, method, &path, body).await;
        check_one(&entries(&op).await, before, "admin", action, target, &seen);
        oks += usize::from(seen.status.is_none());
        match (&seen.job, action) {
            (Some(job), "failover.planned") => planned_job = Some(job.clone()),
            (Some(job), a) if ends_alone.contains(&a) => wait_final(&op, job).await,
            _ => {}
        }
        if action == "failover.cancel" {
            if let Some(job) = planned_job.take() {
                wait_final(&op, &job).await;
            }
        }
    }
    // Most of the walk succeeds; the refusals in it (no failback to commit, no paused job)
    // are recorded with their status and code, checked above.
    assert!(oks >= 24, "only {oks} actions succeeded");

    // Reads are not recorded.
    let before = last_seq(&entries(&op).await);
    let _: Value = op.get_json("/v1/vms").await.unwrap();
    let _: Value = op.get_json("/v1/hosts").await.unwrap();
    assert_eq!(last_seq(&entries(&op).await), before);

    // The chain is whole: each entry names its predecessor's hash.
    let all = entries(&op).await;
    for w in all.windows(2) {
        assert_eq!(w[1]["prev"], w[0]["hash"]);
        assert_eq!(
            w[1]["seq"].as_u64().unwrap(),
            w[0]["seq"].as_u64().unwrap() + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_recorded_as_refused() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let op = server.operator();
    let creds = server.add_host("hv01", None);
    let host = server.client_with(&Server::host_token(&creds));
    let stranger = server.client_with("dv_op_not-a-token-of-this-server");

    // A host token on an admin route (403), a token of no one (401), and bad input to an
    // action (404): each an action refused, recorded once with its status and code.
    let cases = [
        (
            &host,
            Method::POST,
            "/v1/hosts",
            Some(json!({"name": "evil"})),
            403,
            "host/hv01",
            "host.add",
            "host/evil",
            None,
        ),
        (
            &stranger,
            Method::POST,
            "/v1/keys/rotate",
            None,
            401,
            "unknown",
            "key.rotate",
            "vault",
            Some("unauthorized"),
        ),
        (
            &op,
            Method::POST,
            "/v1/vms/nosuchvm/failover",
            Some(json!({"kind": "test"})),
            404,
            "admin",
            "failover.test",
            "vm/nosuchvm",
            None,
        ),
    ];
    let mut before = 0;
    for (client, method, path, body, status, actor, action, target, code) in cases {
        before = last_seq(&entries(&op).await);
        let seen = call(client, method, path, body).await;
        assert_eq!(seen.status, Some(status), "{path}");
        check_one(&entries(&op).await, before, actor, action, target, &seen);
        if let Some(code) = code {
            assert_eq!(seen.code.as_deref(), Some(code));
        }
    }
    assert_eq!(server.vault_objects("audit").len() as u64, before + 1);
}

fn entry_path(server: &Server, seq: u64) -> PathBuf {
    server
        .data_dir
        .join("vault")
        .join("audit")
        .join(format!("{seq:020}"))
}

/// Runs `drvault verify --json`: its exit code and the audit breaks, as (seq, problem).
fn verify_audit(server: &Server) -> (Option<i32>, Vec<(u64, String)>) {
    let o = server.cli(&["verify", "--json"]);
    let r: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify --json: {e}: {}", String::from_utf8_lossy(&o.stderr)));
    let breaks = r["audit_damage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["kind"], "audit_chain", "{d}");
            (
                d["seq"].as_u64().unwrap(),
                d["problem"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (o.status.code(), breaks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_edited_removed_and_swapped_entries() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let op = server.operator();
    for n in 1..=7 {
        call(
            &op,
            Method::POST,
            "/v1/hosts",
            Some(json!({"name": format!("hv{n:02}")})),
        )
        .await;
    }
    assert_eq!(last_seq(&entries(&op).await), 7);
    let (code, breaks) = verify_audit(&server);
    assert_eq!(
        (code, breaks),
        (Some(0), vec![]),
        "an untouched log is whole"
    );

    // Edit: one byte of entry 2 changed in place.
    let p = entry_path(&server, 2);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&p, &bytes).unwrap();
    let (code, breaks) = verify_audit(&server);
    assert_eq!(code, Some(7));
    assert_eq!(breaks, [(2, "corrupt".to_string())]);

    // Removal: entry 4 deleted.
    std::fs::remove_file(entry_path(&server, 4)).unwrap();
    let (code, breaks) = verify_audit(&server);
    assert_eq!(code, Some(7));
    assert_eq!(breaks, [(2, "corrupt".into()), (4, "missing".into())]);

    // Reorder: entries 6 and 7 swapped.
    let (six, seven) = (entry_path(&server, 6), entry_path(&server, 7));
    let (a, b) = (std::fs::read(&six).unwrap(), std::fs::read(&seven).unwrap());
    std::fs::write(&six, b).unwrap();
    std::fs::write(&seven, a).unwrap();
    let (code, breaks) = verify_audit(&server);
    assert_eq!(code, Some(7));
    assert_eq!(
        breaks,
        [
            (2, "corrupt".into()),
            (4, "missing".into()),
            (6, "corrupt".into()),
            (7, "corrupt".into())
        ]
    );
    // The text report names each one.
    let o = server.cli(&["verify"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for seq in [2, 4, 6, 7] {
        assert!(
            text.contains(&format!("DAMAGED audit entry {seq} (audit_chain")),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_entries_and_bad_queries_get_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let op = server.operator();
    server.add_host("hv01", None);
    server.add_host("hv02", None);

    let table = server.cli_ok(&["audit"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("   SEQ AT"), "{table}");
    assert!(
        lines[1].contains("admin")
            && lines[1].contains("host.add")
            && lines[1].contains("host/hv01"),
        "{table}"
    );
    assert!(lines[2].contains("host/hv02"), "{table}");

    let json: Value =
        serde_json::from_str(&server.cli_ok(&["audit", "--json", "--limit", "1"])).unwrap();
    let e = &json["entries"];
    assert_eq!(e.as_array().unwrap().len(), 1);
    assert_eq!(e[0]["target"], "host/hv02");
    let since = e[0]["at"].as_str().unwrap().to_string();
    let json: Value =
        serde_json::from_str(&server.cli_ok(&["audit", "--json", "--since", &since])).unwrap();
    assert!(json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["at"].as_str().unwrap() >= since.as_str()));
    assert!(json["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["target"] == "host/hv02"));
    let future: Value = serde_json::from_str(&server.cli_ok(&[
        "audit",
        "--json",
        "--since",
        "2999-01-01T00:00:00Z",
    ]))
    .unwrap();
    assert_eq!(future["entries"], json!([]));

    // The CLI refuses a bad time or limit before asking.
    for args in [
        &["audit", "--since", "notadate"][..],
        &["audit", "--limit", "0"][..],
        &["audit", "--limit", "5000"][..],
    ] {
        let o = server.cli(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("--since") || err.contains("--limit"),
            "{args:?}: {err}"
        );
    }
    assert!(
        String::from_utf8_lossy(&server.cli(&["audit", "--since", "notadate"]).stderr)
            .contains("RFC 3339")
    );

    // The API refuses them with a code.
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("limit=99999999999", "invalid_query"),
        ("since=notadate", "invalid_since"),
        ("colour=blue", "invalid_query"),
    ] {
        let (status, got, _) = refused(op.get_json(&format!("/v1/audit?{query}")).await);
        assert_eq!(
            (status, got.as_str()),
            (StatusCode::BAD_REQUEST, code),
            "{query}"
        );
    }
}

/// `drvault_audit_write_errors_total` as /metrics shows it.
async fn write_errors(c: &Client) -> f64 {
    let (text, _) = c.get_bytes("/metrics").await.unwrap();
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("drvault_audit_write_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drvault_audit_write_errors_total in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_cannot_be_written_does_not_undo_the_action_and_is_written_later() {
    let t = tempfile::tempdir().unwrap();
    let (server, mut faults) = FaultRules::start(t.path(), Some(CONFIG));
    let op = server.operator();
    server.add_host("hv01", None);
    assert_eq!(write_errors(&op).await, 0.0);

    faults.set(&server, "op=put_if_absent prefix=audit/ kind=error");
    // The actions happen and answer as they would; their entries wait.
    for name in ["hv02", "hv03"] {
        let seen = call(&op, Method::POST, "/v1/hosts", Some(json!({"name": name}))).await;
        assert_eq!(seen.status, None, "{name}: {seen:?}");
    }
    let hosts: Value = op.get_json("/v1/hosts").await.unwrap();
    assert_eq!(hosts.as_array().unwrap().len(), 3, "{hosts}");
    assert!(write_errors(&op).await >= 2.0);
    assert_eq!(
        last_seq(&entries(&op).await),
        1,
        "nothing written while the store refuses"
    );
    assert!(
        server.log().contains("audit entry not written yet"),
        "{}",
        server.log()
    );

    // Once the store takes writes again, the queue is written in order by the retry.
    faults.set(&server, "# healed");
    let all = eventually_async(
        Duration::from_secs(60),
        "queued entries written",
        || async {
            let all = entries(&op).await;
            (all.len() == 3)
                .then_some(all.clone())
                .ok_or(format!("{all:?}"))
        },
    )
    .await;
    let targets: Vec<&str> = all.iter().map(|e| e["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["host/hv01", "host/hv02", "host/hv03"]);
    for w in all.windows(2) {
        assert_eq!(w[1]["prev"], w[0]["hash"]);
    }
    let (code, breaks) = verify_audit(&server);
    assert_eq!((code, breaks), (Some(0), vec![]));
}
