//! The auth matrix and bad input of the protection API: each refused with the right status and
//! a `{code, message, recoverable}` body, and each leaving the vault unchanged.

use crate::common;

use bytes::Bytes;
use common::*;
use drvault::client::{Client, ClientError};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn status(r: Result<Value, ClientError>) -> (StatusCode, String, bool) {
    match r {
        Ok(v) => panic!("expected a refusal, got {v}"),
        Err(ClientError::Api { status, body, .. }) => {
            assert!(!body.message.is_empty());
            (status, body.code, body.recoverable)
        }
        Err(e) => panic!("expected an API error, got {e}"),
    }
}

fn hash(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

struct World {
    _t: tempfile::TempDir,
    server: Server,
    a: Client,
    b: Client,
    op: Client,
}

fn world() -> World {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some("[vault]\nblock_size = 1048576\n"));
    let ca = server.add_host("hv-a", Some("cloud1"));
    let cb = server.add_host("hv-b", Some("cloud2"));
    let a = server.client_with(&Server::host_token(&ca));
    let b = server.client_with(&Server::host_token(&cb));
    let op = server.operator();
    World {
        _t: t,
        server,
        a,
        b,
        op,
    }
}

async fn snapshot(w: &World) -> (Vec<String>, Value) {
    let vms: Value = w.op.get_json("/v1/vms").await.unwrap();
    // The audit log records refused requests too (tests/it/audit.rs): everything else must stay.
    let objects = w.server.vault_objects("");
    (
        objects
            .into_iter()
            .filter(|k| !k.starts_with("audit/"))
            .collect(),
        vms,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix() {
    let w = world();
    let spec = json!({"disks": [{"id": "os", "size": 4 * MIB}]});
    let _: Value =
        w.a.send_json(Method::PUT, "/v1/agent/vms/vm-a", &spec)
            .await
            .unwrap();
    let before = snapshot(&w).await;

    // No token, wrong token: 401.
    let anon = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(w.server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let r = anon
        .get(format!("{}/v1/vms", w.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    assert_eq!(body["recoverable"], false);
    let wrong = w.server.client_with("drvh_0000");
    assert_eq!(
        status(wrong.get_json("/v1/agent/vms/vm-a").await).0,
        StatusCode::UNAUTHORIZED
    );
    // Operator token on agent routes, host token on operator routes: 403.
    assert_eq!(
        status(
            w.op.send_json(Method::PUT, "/v1/agent/vms/vm-x", &spec)
                .await
        )
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(w.a.get_json("/v1/vms").await).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(
            w.a.send_json(Method::POST, "/v1/hosts", &json!({"name": "evil"}))
                .await
        )
        .0,
        StatusCode::FORBIDDEN
    );
    // Host B on host A's VM: 403 for reads, writes and re-enabling.
    assert_eq!(
        status(w.b.get_json("/v1/agent/vms/vm-a").await).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(
            w.b.send_json(Method::PUT, "/v1/agent/vms/vm-a", &spec)
                .await
        )
        .0,
        StatusCode::FORBIDDEN
    );
    let block = Bytes::from(vec![7u8; MIB as usize]);
    let r =
        w.b.put_bytes::<Value>(
            "/v1/agent/vms/vm-a/disks/os/blocks/0",
            &[("x-drvault-blake3", hash(&block))],
            block.clone(),
        )
        .await;
    assert_eq!(status(r).0, StatusCode::FORBIDDEN);
    // Host A acting as host B: 403.
    let a_as_b = w.a.clone().acting_for(Some("hv-b".into()));
    assert_eq!(
        status(a_as_b.get_json("/v1/agent/vms/vm-a").await).0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        snapshot(&w).await,
        before,
        "refused requests changed the vault"
    );

    // Providers act for the hosts of their cloud only.
    let prov: Value =
        w.op.send_json(
            Method::POST,
            "/v1/providers",
            &json!({"name": "vmm1", "cloud": "cloud1"}),
        )
        .await
        .unwrap();
    let p = w.server.client_with(prov["token"].as_str().unwrap());
    assert_eq!(
        status(p.get_json("/v1/agent/vms/vm-a").await).1,
        "acting_host_required"
    );
    let _: Value = p
        .clone()
        .acting_for(Some("hv-a".into()))
        .get_json("/v1/agent/vms/vm-a")
        .await
        .unwrap();
    assert_eq!(
        status(
            p.clone()
                .acting_for(Some("hv-b".into()))
                .get_json("/v1/agent/vms/vm-a")
                .await
        )
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(status(p.get_json("/v1/vms").await).0, StatusCode::FORBIDDEN);

    // A removed host's token stops working at once.
    w.op.delete("/v1/hosts/hv-b").await.unwrap();
    assert_eq!(
        status(w.b.get_json("/v1/agent/vms/vm-a").await).0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(
            w.op.send_json(Method::POST, "/v1/hosts", &json!({"name": "hv-a"}))
                .await
        )
        .1,
        "host_exists"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    let w = world();
    let spec = json!({"disks": [{"id": "os", "size": 3 * MIB + 512}]});
    let _: Value =
        w.a.send_json(Method::PUT, "/v1/agent/vms/vm-a", &spec)
            .await
            .unwrap();
    let before = snapshot(&w).await;
    let block = Bytes::from(vec![9u8; MIB as usize]);
    let h = hash(&block);
    let put = |path: &str, hdr: Option<String>, body: Bytes| {
        let a = w.a.clone();
        let path = path.to_string();
        async move {
            let headers: Vec<(&str, String)> = hdr
                .map(|h| vec![("x-drvault-blake3", h)])
                .unwrap_or_default();
            a.put_bytes::<Value>(&path, &headers, body).await
        }
    };
    let cases: Vec<(&str, (StatusCode, String, bool))> = vec![
        (
            "unknown VM",
            status(w.a.get_json("/v1/agent/vms/nope").await),
        ),
        (
            "unknown disk",
            status(
                put(
                    "/v1/agent/vms/vm-a/disks/nope/blocks/0",
                    Some(h.clone()),
                    block.clone(),
                )
                .await,
            ),
        ),
        (
            "index past the end",
            status(
                put(
                    "/v1/agent/vms/vm-a/disks/os/blocks/4",
                    Some(h.clone()),
                    block.clone(),
                )
                .await,
            ),
        ),
        (
            "body longer than the block",
            status(
                put(
                    "/v1/agent/vms/vm-a/disks/os/blocks/0",
                    Some(hash(&vec![9u8; MIB as usize + 1])),
                    Bytes::from(vec![9u8; MIB as usize + 1]),
                )
                .await,
            ),
        ),
        (
            "short last block given a full one",
            status(
                put(
                    "/v1/agent/vms/vm-a/disks/os/blocks/3",
                    Some(h.clone()),
                    block.clone(),
                )
                .await,
            ),
        ),
        (
            "hash mismatch",
            status(
                put(
                    "/v1/agent/vms/vm-a/disks/os/blocks/0",
                    Some(hash(b"other")),
                    block.clone(),
                )
                .await,
            ),
        ),
        (
            "missing hash",
            status(put("/v1/agent/vms/vm-a/disks/os/blocks/0", None, block.clone()).await),
        ),
        (
            "non-numeric index",
            status(
                put(
                    "/v1/agent/vms/vm-a/disks/os/blocks/x1",
                    Some(h.clone()),
                    block.clone(),
                )
                .await,
            ),
        ),
        (
            "size not a multiple of 512",
            status(
                w.a.send_json(
                    Method::PUT,
                    "/v1/agent/vms/vm-b",
                    &json!({"disks": [{"id": "os", "size": 1000}]}),
                )
                .await,
            ),
        ),
        (
            "malformed JSON",
            status(
                w.a.send_json(Method::PUT, "/v1/agent/vms/vm-b", &json!({"disks": "nope"}))
                    .await,
            ),
        ),
        (
            "unknown field",
            status(
                w.a.send_json(
                    Method::PUT,
                    "/v1/agent/vms/vm-b",
                    &json!({"disks": [], "bogus": 1}),
                )
                .await,
            ),
        ),
        (
            "path-like VM name",
            status(w.a.get_json("/v1/agent/vms/..%2Fetc").await),
        ),
        (
            "dot-dot VM name",
            status(w.a.get_json("/v1/agent/vms/%2e%2e").await),
        ),
        (
            "very long VM name",
            status(
                w.a.get_json(&format!("/v1/agent/vms/{}", "v".repeat(300)))
                    .await,
            ),
        ),
        (
            "completion with unsorted runs",
            status(
                w.a.send_json(
                    Method::POST,
                    "/v1/agent/vms/vm-a/disks/os/complete",
                    &json!({"data_runs": [[2, 1], [0, 1]], "digest": h}),
                )
                .await,
            ),
        ),
        (
            "completion with missing blocks",
            status(
                w.a.send_json(
                    Method::POST,
                    "/v1/agent/vms/vm-a/disks/os/complete",
                    &json!({"data_runs": [[0, 2]], "digest": h}),
                )
                .await,
            ),
        ),
        (
            "different spec for an existing VM",
            status(
                w.a.send_json(
                    Method::PUT,
                    "/v1/agent/vms/vm-a",
                    &json!({"disks": [{"id": "os", "size": 8 * MIB}]}),
                )
                .await,
            ),
        ),
    ];
    let expect = [
        (StatusCode::NOT_FOUND, "vm_not_found"),
        (StatusCode::NOT_FOUND, "disk_not_found"),
        (StatusCode::BAD_REQUEST, "block_out_of_range"),
        (StatusCode::BAD_REQUEST, "body_too_long"),
        (StatusCode::BAD_REQUEST, "body_too_long"),
        (StatusCode::BAD_REQUEST, "hash_mismatch"),
        (StatusCode::BAD_REQUEST, "missing_hash"),
        (StatusCode::BAD_REQUEST, "invalid_index"),
        (StatusCode::BAD_REQUEST, "invalid_vm_spec"),
        (StatusCode::BAD_REQUEST, "invalid_json"),
        (StatusCode::BAD_REQUEST, "invalid_json"),
        (StatusCode::BAD_REQUEST, "invalid_name"),
        // The URL parser resolves `%2e%2e` as a dot segment before sending: no route matches.
        (StatusCode::NOT_FOUND, "no_such_route"),
        (StatusCode::BAD_REQUEST, "invalid_name"),
        (StatusCode::BAD_REQUEST, "invalid_runs"),
        (StatusCode::CONFLICT, "blocks_missing"),
        (StatusCode::CONFLICT, "vm_exists"),
    ];
    for ((what, got), (st, code)) in cases.iter().zip(expect) {
        assert_eq!((got.0, got.1.as_str()), (st, code), "{what}");
        assert!(!got.2, "{what}: bad input is not recoverable");
    }
    assert_eq!(
        snapshot(&w).await,
        before,
        "refused requests changed the vault"
    );

    // A body cut off mid-upload stores nothing.
    let stream = futures_util::stream::iter(vec![
        Ok::<_, std::io::Error>(Bytes::from(vec![9u8; 100_000])),
        Err(std::io::Error::other("cable pulled")),
    ]);
    let c = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(w.server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let token = Server::host_token(&w.server.dir.join("hv-a.creds.json"));
    let r = c
        .put(format!(
            "{}/v1/agent/vms/vm-a/disks/os/blocks/0",
            w.server.url
        ))
        .bearer_auth(token)
        .header("x-drvault-blake3", h.clone())
        .header("content-length", MIB.to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    assert!(r.map(|r| !r.status().is_success()).unwrap_or(true));
    // Nothing may appear: a negative check has no condition to wait for, so it watches the
    // vault for a while after the server saw the cut.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        snapshot(&w).await,
        before,
        "a cut-off body stored something"
    );

    // The same block uploaded twice: one chunk, the second is acknowledged as already received.
    let first: Value = put(
        "/v1/agent/vms/vm-a/disks/os/blocks/0",
        Some(h.clone()),
        block.clone(),
    )
    .await
    .unwrap();
    assert_eq!(first["outcome"], "stored");
    let objects = w.server.vault_objects("");
    let again: Value = put(
        "/v1/agent/vms/vm-a/disks/os/blocks/0",
        Some(h.clone()),
        block.clone(),
    )
    .await
    .unwrap();
    assert_eq!(again["outcome"], "already_received");
    assert_eq!(
        w.server.vault_objects(""),
        objects,
        "a retried block changed the vault"
    );
}

/// Starts `drvault serve` on `data_dir` and returns its exit status and stderr once it has
/// exited; panics if it starts serving instead (it wrote server.json) within the deadline.
fn serve_refused(dir: &std::path::Path, data_dir: &std::path::Path, what: &str) -> (i32, String) {
    use std::time::{Duration, Instant};
    let _ = std::fs::remove_file(data_dir.join("server.json"));
    let err_path = dir.join(format!("serve-{}.err", what.replace('/', "-")));
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let err = std::fs::read_to_string(&err_path).unwrap();
            return (st.code().unwrap_or(-1), err);
        }
        if data_dir.join("server.json").exists() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server started with {what} readable by others");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every secret file the server reads (master key, operator token, TLS private key) readable
/// by group or others stops the start, naming the file and the chmod to run; at 0600 it starts.
#[test]
fn secret_files_readable_by_others_stop_the_server_from_starting() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let mut server = Server::start(t.path(), None);
    server.stop();
    for name in ["master.key", "operator.token", "tls/key.pem"] {
        let path = server.data_dir.join(name);
        let mode = |m| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m));
        mode(0o644).unwrap();
        let (code, err) = serve_refused(t.path(), &server.data_dir, name);
        assert_ne!(code, 0, "{name}: {err}");
        assert!(
            err.contains(&format!("{} has mode 644", path.display()))
                && err.contains(&format!("chmod 600 {}", path.display())),
            "{name}: {err}"
        );
        mode(0o600).unwrap();
    }
    server.restart();
    assert!(server.alive());
}

/// An operator token given as --token (at any level of subcommands) is warned about, since
/// every user sees it in `ps`; given as DRVAULT_TOKEN it is not.
#[test]
fn a_token_on_the_command_line_is_warned_about_and_drvault_token_is_not() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), None);
    let token_arg = format!("--token={}", server.token);
    let run = |args: &[&str], env_token: bool| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(args).env("DRVAULT_DATA_DIR", &server.data_dir);
        if env_token {
            cmd.env("DRVAULT_TOKEN", &server.token);
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{args:?}: {err}");
        err
    };
    for args in [
        &["vms", "--token", server.token.as_str()][..],
        &["key", "list", token_arg.as_str()][..],
    ] {
        let err = run(args, false);
        assert!(
            err.contains("warning: --token on the command line shows in `ps`")
                && err.contains("set DRVAULT_TOKEN instead"),
            "{args:?}: {err}"
        );
    }
    for args in [&["vms"][..], &["key", "list"][..]] {
        let err = run(args, true);
        assert!(!err.contains("warning"), "{args:?}: {err}");
    }
}

/// One server per data directory: a second `drvault serve` on it is refused, names the running
/// one, and leaves its server.json alone, so the CLI still reaches the first.
#[test]
fn a_second_server_on_the_same_data_directory_is_refused_and_names_the_first() {
    let t = tempfile::tempdir().unwrap();
    let first = Server::start(t.path(), None);
    let server_json = first.data_dir.join("server.json");
    let before = std::fs::read_to_string(&server_json).unwrap();
    let log = t.path().join("second.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut second = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&first.data_dir)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        let now = std::fs::read_to_string(&server_json).unwrap_or_default();
        if now != before || std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!(
                "a second server runs on the same data directory: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{said}");
    let pid = serde_json::from_str::<Value>(&before).unwrap()["pid"].to_string();
    assert!(
        said.contains("in use by another drvault serve")
            && said.contains(&format!("pid {pid}"))
            && said.contains(&first.url),
        "the refusal does not name the running server: {said}"
    );
    assert_eq!(
        std::fs::read_to_string(&server_json).unwrap(),
        before,
        "the refused server touched server.json"
    );
    first.cli_ok(&["vms"]);
}

/// A server whose output goes to a file (not a terminal) writes plain text logs.
#[test]
fn server_logs_written_to_a_file_have_no_colour_codes() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), None);
    // A key rotation: the server logs it as a warning (a level word is coloured on a terminal).
    server.cli_ok(&["key", "rotate"]);
    eventually(
        std::time::Duration::from_secs(20),
        "the rotation is logged",
        || {
            let log = server.log();
            log.contains("key rotated").then_some(()).ok_or(log)
        },
    );
    let log = server.log();
    assert!(log.contains("WARN"), "no log lines to check: {log}");
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log:?}");
}
