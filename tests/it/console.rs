//! The console's server side over real HTTPS: the static assets need no token and carry their
//! type and security headers; the API behind them still refuses requests without the operator
//! token; the figures the console shows that the API gained for it (per-disk stored and
//! deduplicated bytes, where each NIC lands) are right.

use crate::common;

use common::*;
use reqwest::StatusCode;
use serde_json::Value;

/// 1 MiB blocks and the shared test networks (fixtures/networks.toml).
const CONFIG: &str = concat!(
    "[vault]\nblock_size = 1048576\n\n",
    include_str!("../../fixtures/networks.toml")
);

/// A client that trusts the server's self-signed certificate and sends no token.
fn anonymous(server: &Server) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assets_need_no_token_and_carry_type_and_security_headers() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let http = anonymous(&server);
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/console/");
    for (path, ty, file) in [
        ("/", "text/html; charset=utf-8", "index.html"),
        (
            "/console/app.js",
            "text/javascript; charset=utf-8",
            "app.js",
        ),
        ("/console/app.css", "text/css; charset=utf-8", "app.css"),
        ("/console/favicon.svg", "image/svg+xml", "favicon.svg"),
    ] {
        let r = http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let h = r.headers().clone();
        assert_eq!(h["content-type"], ty, "{path}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.starts_with("default-src 'self'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        let body = r.text().await.unwrap();
        let want = std::fs::read_to_string(format!("{src}{file}")).unwrap();
        assert_eq!(body, want, "{path} serves the embedded {file}");
        // HEAD works too (link checkers, proxies).
        let r = http
            .head(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "HEAD {path}");
    }
    // A path under /console/ that is not an asset is the API's JSON 404.
    let r = http
        .get(format!("{}/console/secret.js", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "no_such_route");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_behind_the_console_still_wants_the_operator_token() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let http = anonymous(&server);
    let host = Server::host_token(&server.add_host("hv", None));
    for path in [
        "/v1/server",
        "/v1/vms",
        "/v1/jobs",
        "/v1/vms/web/nics",
        "/v1/vms/web/points",
    ] {
        let r = http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} without token");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "unauthorized");
        let r = http
            .get(format!("{}{path}", server.url))
            .bearer_auth("drvo_wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} wrong token");
        let r = http
            .get(format!("{}{path}", server.url))
            .bearer_auth(&host)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::FORBIDDEN,
            "{path} with a host token"
        );
    }
    // A POST from the page's origin without the token changes nothing either.
    let r = http
        .post(format!("{}/v1/vms/web/failover", server.url))
        .json(&serde_json::json!({"kind": "test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // /metrics (the throughput plot's source) is open, as before.
    let r = http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_show_stored_and_deduplicated_bytes_and_nics_their_mapping() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some(CONFIG));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let img = dir.join("d.raw");
    // Two data blocks (1 MiB each) and one zero block.
    raw_image(&img, 3 * MIB, &[(0, 300_000), (2 * MIB, 100_000)], 5);
    for (vm, nic) in [
        ("first", "network=corp,mac=00:15:5d:00:00:01,ip=10.20.1.7"),
        ("second", "network=lab,mac=00:15:5d:00:00:02"),
    ] {
        server.cli_ok(&[
            "agent",
            "protect",
            "--creds",
            c,
            "--vm",
            vm,
            "--disk",
            &format!("{}:os", img.display()),
            "--nic",
            nic,
        ]);
    }
    let op = server.operator();
    let first: Value = op.get_json("/v1/vms/first").await.unwrap();
    let second: Value = op.get_json("/v1/vms/second").await.unwrap();
    let (d1, d2) = (&first["disks"][0], &second["disks"][0]);
    assert_eq!(d1["data_bytes"], 2 * MIB);
    assert_eq!(d2["data_bytes"], 2 * MIB);
    // The first copy is stored: 400 000 random bytes do not compress, the zeros around them do;
    // the second VM's identical disk is stored once, so all of it is deduplicated.
    let stored = d1["stored_bytes"].as_u64().unwrap();
    assert!(stored > 400_000 && stored < 500_000, "stored {stored}");
    assert_eq!(d1["deduplicated_bytes"], 0);
    assert_eq!(d2["stored_bytes"], 0);
    assert_eq!(d2["deduplicated_bytes"], 2 * MIB);

    let nics: Value = op.get_json("/v1/vms/first/nics").await.unwrap();
    assert_eq!(nics[0]["network"], "corp");
    assert_eq!(nics[0]["ip"], "10.20.1.7");
    assert_eq!(nics[0]["failover_target"], "recovery-vnet/app");
    assert_eq!(nics[0]["failover_target_from"], "mapping");
    assert_eq!(nics[0]["test_target"], "drill-vnet/app");
    let nics: Value = op.get_json("/v1/vms/second/nics").await.unwrap();
    assert_eq!(nics[0]["failover_target"], Value::Null, "lab is unmapped");
    // A NIC override shows as the failover target.
    server.cli_ok(&["vm", "nic", "second", "0", "--target", "recovery-vnet/app"]);
    let nics: Value = op.get_json("/v1/vms/second/nics").await.unwrap();
    assert_eq!(nics[0]["failover_target"], "recovery-vnet/app");
    assert_eq!(nics[0]["failover_target_from"], "override");
    // Unknown VM and bad names are refused like every VM route.
    let e = op.get_json::<Value>("/v1/vms/nope/nics").await.unwrap_err();
    assert_eq!(e.code(), Some("vm_not_found"));
    let e = op.get_json::<Value>("/v1/vms/..x/nics").await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_name"));
}
