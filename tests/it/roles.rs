//! Accounts and roles (issue 21), through the API and the CLI of a real server: each role against
//! one route of each family, token rotation for accounts and hosts (the host's agent keeps
//! replicating with its rewritten credentials file), expiry, and bad input that changes nothing.

use crate::common;

use std::time::Duration;

use common::*;
use drvault::client::{Client, ClientError};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// 1 MiB blocks and the shared test networks (fixtures/networks.toml), so drills can run.
const CONFIG: &str = concat!(
    "[vault]\nblock_size = 1048576\n\n",
    include_str!("../../fixtures/networks.toml")
);

/// The status, code and message of a refusal (panics on success).
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (StatusCode, String, String) {
    match r {
        Err(ClientError::Api { status, body, .. }) => (status, body.code, body.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Creates account `name` with `role` as the admin and returns a client holding its token.
async fn account(server: &Server, name: &str, role: &str) -> Client {
    let t: Value = server
        .operator()
        .send_json(
            Method::POST,
            "/v1/accounts",
            &json!({"name": name, "role": role}),
        )
        .await
        .unwrap();
    assert_eq!(t["role"], role, "{t}");
    server.client_with(t["token"].as_str().unwrap())
}

/// A host `hv` protecting VM web01 (one 2 MiB raw disk `d`, NIC on the mapped network corp):
/// its credentials file and the disk image.
fn protected(server: &Server) -> (std::path::PathBuf, std::path::PathBuf) {
    let creds = server.add_host("hv", None);
    let img = server.dir.join("d.raw");
    raw_image(&img, 2 * MIB, &[(0, 100_000)], 4);
    server.protect(
        &creds,
        "web01",
        &format!("{}:d", img.display()),
        &["--nic", "network=corp,mac=00:15:5d:00:01:01"],
    );
    (creds, img)
}

async fn wait_drill(server: &Server) {
    eventually_async(Duration::from_secs(120), "the drill succeeds", || async {
        let v: Value = server
            .operator()
            .get_json("/v1/vms/web01/failover")
            .await
            .map_err(|e| e.to_string())?;
        match v["record"]["state"].as_str() {
            Some("succeeded") => Ok(()),
            Some("failed") => panic!("drill failed: {v}"),
            _ => Err(v.to_string()),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_its_routes_and_is_refused_the_others_naming_the_role() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    protected(&server);
    let admin = server.operator();
    let viewer = account(&server, "ann", "viewer").await;
    let operator = account(&server, "otto", "operator").await;

    // Who am I: the first start's token is account admin.
    for (c, name, role) in [
        (&admin, "admin", "admin"),
        (&viewer, "ann", "viewer"),
        (&operator, "otto", "operator"),
    ] {
        let w: Value = c.get_json("/v1/whoami").await.unwrap();
        assert_eq!(
            w,
            json!({"account": name, "role": role, "expires_at": null})
        );
    }

    // Reads: every role.
    for c in [&viewer, &operator, &admin] {
        for path in [
            "/v1/vms",
            "/v1/vms/web01/points",
            "/v1/jobs",
            "/v1/hosts",
            "/v1/keys",
            "/v1/accounts",
        ] {
            c.get_json::<Value>(path)
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }

    // A drill: the viewer is refused, naming the role needed and its own; nothing starts.
    let drill = json!({"kind": "test"});
    let (status, code, message) = refusal(
        viewer
            .send_json::<_, Value>(Method::POST, "/v1/vms/web01/failover", &drill)
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "role_required")
    );
    assert_eq!(
        message,
        "this needs role operator; account ann has role viewer"
    );
    let jobs: Vec<Value> = admin.get_json("/v1/jobs?vm=web01").await.unwrap();
    assert!(
        !jobs.iter().any(|j| j["kind"] == "test_failover"),
        "{jobs:?}"
    );
    // The operator runs it and cleans it up.
    let started: Value = operator
        .send_json(Method::POST, "/v1/vms/web01/failover", &drill)
        .await
        .unwrap();
    assert_eq!(started["kind"], "test", "{started}");
    wait_drill(&server).await;
    let (status, code, _) = refusal(
        viewer
            .send_json::<_, Value>(Method::POST, "/v1/vms/web01/failover/cleanup", &json!({}))
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "role_required")
    );
    operator
        .send_json::<_, Value>(Method::POST, "/v1/vms/web01/failover/cleanup", &json!({}))
        .await
        .unwrap();

    // Hosts, keys, accounts, gc: admin only.
    let hosts_before: Value = admin.get_json("/v1/hosts").await.unwrap();
    for (who, c, actual) in [("ann", &viewer, "viewer"), ("otto", &operator, "operator")] {
        for (method, path, body) in [
            (Method::POST, "/v1/hosts", json!({"name": "hv-new"})),
            (Method::POST, "/v1/hosts/hv/token", json!({})),
            (Method::POST, "/v1/keys/rotate", json!({})),
            (
                Method::POST,
                "/v1/accounts",
                json!({"name": "eve", "role": "admin"}),
            ),
            (Method::POST, "/v1/gc", json!({"dry_run": true})),
        ] {
            let (status, code, message) =
                refusal(c.send_json::<_, Value>(method.clone(), path, &body).await);
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::FORBIDDEN, "role_required"),
                "{who} {method} {path}"
            );
            assert_eq!(
                message,
                format!("this needs role admin; account {who} has role {actual}")
            );
        }
        let (status, code, _) = refusal(c.delete("/v1/accounts/admin").await);
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::FORBIDDEN, "role_required")
        );
    }
    assert_eq!(
        admin.get_json::<Value>("/v1/hosts").await.unwrap(),
        hosts_before
    );
    let names: Vec<Value> = admin.get_json("/v1/accounts").await.unwrap();
    let names: Vec<&str> = names.iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["admin", "ann", "otto"]);
    // The admin can.
    let creds: Value = admin
        .send_json(Method::POST, "/v1/hosts", &json!({"name": "hv-new"}))
        .await
        .unwrap();
    assert_eq!(creds["kind"], "host");
    // Account tokens still open no agent route, and host tokens no operator route.
    let (status, code, _) = refusal(operator.get_json::<Value>("/v1/agent/vms/web01").await);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    let host = server.client_with(creds["token"].as_str().unwrap());
    let (status, code, _) = refusal(host.get_json::<Value>("/v1/whoami").await);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_tokens_revoke_the_old_ones_and_the_host_agent_keeps_replicating() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some(CONFIG));
    let (creds, img) = protected(&server);
    let old_host = Server::host_token(&creds);

    // The host: a new token written into its credentials file; the old one is refused.
    let out = server.cli_ok(&["host", "rotate-token", "hv", "-o", creds.to_str().unwrap()]);
    assert!(out.contains("the old token no longer works"), "{out}");
    let new_host = Server::host_token(&creds);
    assert_ne!(new_host, old_host);
    let (status, code, _) = refusal(
        server
            .client_with(&old_host)
            .get_json::<Value>("/v1/agent/vms/web01")
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&creds).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The agent goes on with the rewritten file: the VM was not protected again, its next log
    // makes point c1.
    let mut rng = Rng(21);
    let next = dir.join("d1.raw");
    let log = dir.join("d1.hrl");
    next_cycle(&mut rng, &img, &next, &log, ZERO_GUID, 8, 64 * KIB);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "web01",
        "--disk",
        "d",
        "--hrl",
        log.to_str().unwrap(),
        "--cycle",
        "1",
    ]);
    let points: Vec<Value> = server
        .operator()
        .get_json("/v1/vms/web01/points")
        .await
        .unwrap();
    let ids: Vec<&str> = points.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["c0", "c1"], "{points:?}");

    // An account: the rotated token works, the old one is refused.
    let ann = account(&server, "ann", "operator").await;
    let rotated: Value = server
        .operator()
        .send_json(Method::POST, "/v1/accounts/ann/token", &json!({}))
        .await
        .unwrap();
    assert_eq!(rotated["account"], "ann");
    let (status, code, _) = refusal(ann.get_json::<Value>("/v1/whoami").await);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let ann = server.client_with(rotated["token"].as_str().unwrap());
    let w: Value = ann.get_json("/v1/whoami").await.unwrap();
    assert_eq!(w["account"], "ann");

    // The admin rotates its own token with the CLI, which rewrites the data directory's token
    // file: the CLI keeps working, the old token does not, not even after a restart.
    let old_admin = server.token.clone();
    server.cli_ok(&["account", "rotate", "admin"]);
    let file = std::fs::read_to_string(server.data_dir.join("operator.token")).unwrap();
    assert_ne!(file.trim(), old_admin);
    server.cli_ok(&["vms"]);
    let (status, _, _) = refusal(server.operator().get_json::<Value>("/v1/vms").await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let server = server.restart_clean(Some(CONFIG));
    let (status, code, _) = refusal(
        server
            .client_with(&old_admin)
            .get_json::<Value>("/v1/vms")
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let w: Value = server
        .client_with(file.trim())
        .get_json("/v1/whoami")
        .await
        .unwrap();
    assert_eq!(w["account"], "admin");
    assert_eq!(w["role"], "admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_token_expired() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), None);
    let admin = server.operator();
    let now = drvault::util::unix_now();
    // Far ahead: works, and says when it ends.
    let later = drvault::util::rfc3339(now + 86_400);
    let made: Value = admin
        .send_json(
            Method::POST,
            "/v1/accounts",
            &json!({"name": "temp", "role": "viewer", "expires_at": later}),
        )
        .await
        .unwrap();
    let w: Value = server
        .client_with(made["token"].as_str().unwrap())
        .get_json("/v1/whoami")
        .await
        .unwrap();
    assert_eq!(w["expires_at"], later.as_str());
    // A few seconds ahead: once that time has passed, refused with its own code.
    let soon: Value = admin
        .send_json(
            Method::POST,
            "/v1/accounts/temp/token",
            &json!({"expires_at": drvault::util::rfc3339(drvault::util::unix_now() + 3)}),
        )
        .await
        .unwrap();
    let c = server.client_with(soon["token"].as_str().unwrap());
    let message = eventually_async(Duration::from_secs(60), "the token expires", || async {
        match c.get_json::<Value>("/v1/vms").await {
            Err(ClientError::Api { status, body, .. }) if body.code == "token_expired" => {
                assert_eq!(status, StatusCode::UNAUTHORIZED);
                Ok(body.message)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(message.contains("account temp"), "{message}");
    // Listing shows no live token for it.
    let accounts: Vec<Value> = admin.get_json("/v1/accounts").await.unwrap();
    let temp = accounts.iter().find(|a| a["name"] == "temp").unwrap();
    assert_eq!(temp["tokens"], 0, "{temp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_account_requests_are_refused_and_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), None);
    let admin = server.operator();
    let before: Value = admin.get_json("/v1/accounts").await.unwrap();

    let (status, code, message) = refusal(
        admin
            .send_json::<_, Value>(
                Method::POST,
                "/v1/accounts",
                &json!({"name": "root", "role": "superuser"}),
            )
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_role")
    );
    for role in ["\"superuser\"", "viewer", "operator", "admin"] {
        assert!(message.contains(role), "{role} not in {message}");
    }
    for (body, want) in [
        (
            json!({"name": "old", "role": "viewer", "expires_at": "2001-01-01T00:00:00Z"}),
            "invalid_expiry",
        ),
        (
            json!({"name": "odd", "role": "viewer", "expires_at": "next tuesday"}),
            "invalid_expiry",
        ),
        (json!({"name": "../x", "role": "viewer"}), "invalid_name"),
    ] {
        let (status, code, _) = refusal(
            admin
                .send_json::<_, Value>(Method::POST, "/v1/accounts", &body)
                .await,
        );
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, want),
            "{body}"
        );
    }
    assert_eq!(
        admin.get_json::<Value>("/v1/accounts").await.unwrap(),
        before
    );

    // The only admin cannot be removed; with a second one it can, and its token stops working.
    let (status, code, message) = refusal(admin.delete("/v1/accounts/admin").await);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "last_admin")
    );
    assert!(message.contains("last admin"), "{message}");
    admin.get_json::<Value>("/v1/whoami").await.unwrap();

    let second = account(&server, "root", "admin").await;
    let (status, code, _) = refusal(
        admin
            .send_json::<_, Value>(
                Method::POST,
                "/v1/accounts",
                &json!({"name": "root", "role": "viewer"}),
            )
            .await,
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "account_exists")
    );
    let root: Value = second.get_json("/v1/whoami").await.unwrap();
    assert_eq!(root["role"], "admin", "the duplicate changed nothing");
    let (status, code, _) = refusal(admin.delete("/v1/accounts/nobody").await);
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "account_not_found")
    );

    second.delete("/v1/accounts/admin").await.unwrap();
    let (status, _, _) = refusal(admin.get_json::<Value>("/v1/whoami").await);
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Now root is the last admin.
    let (_, code, _) = refusal(second.delete("/v1/accounts/root").await);
    assert_eq!(code, "last_admin");
}

/// The CLI: accounts listed (with --json), added with a token file, roles explained in --help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_commands_list_add_and_explain_the_roles() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), None);
    let help = server.cli_ok(&["account", "--help"]);
    for role in ["viewer", "operator", "admin"] {
        assert!(help.contains(role), "{help}");
    }
    let token_file = server.dir.join("ann.token");
    server.cli_ok(&[
        "account",
        "add",
        "ann",
        "--role",
        "viewer",
        "-o",
        token_file.to_str().unwrap(),
    ]);
    let token = std::fs::read_to_string(&token_file).unwrap();
    let list: Value = serde_json::from_str(&server.cli_ok(&["account", "list", "--json"])).unwrap();
    assert_eq!(list[1]["name"], "ann");
    assert_eq!(list[1]["role"], "viewer");
    // The viewer's CLI reads, and is told what its role lacks.
    let o = std::process::Command::new(BIN)
        .args(["host", "add", "hv9"])
        .env("DRVAULT_DATA_DIR", &server.data_dir)
        .env("DRVAULT_TOKEN", token.trim())
        .current_dir(&server.dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("needs role admin; account ann has role viewer"),
        "{err}"
    );
    assert!(!server.dir.join("hv9.creds.json").exists());
    let bad = server.cli(&["account", "add", "x", "--role", "superuser"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("role \"superuser\" does not exist"), "{err}");
}
