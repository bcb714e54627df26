//! Hostile clients against a real server: requests sent byte for byte over TLS (no client
//! library to normalize paths or finish what it started), each checked for the right refusal
//! and for leaving nothing behind, while ordinary clients keep being served.
//!
//! `tests/it/api_auth.rs` holds the auth matrix of single requests and the bad-input table; here
//! are the sweeps over every route, names no URL library would send, oversized and trickled
//! requests, silent connections and the per-host rate limit.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use drvault::client::{Client, ClientError};
use reqwest::Method;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Hostile connections opened by every test of this run (the README's "bad inputs tried"):
/// each test prints the running total when it ends, so the last line printed is the total.
static HOSTILE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn tally(test: &str) {
    let n = HOSTILE.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{test}: hostile requests so far in this run: {n}");
}

/// A request of a sweep: method, path, headers, body.
type Request<'a> = (&'a str, String, Vec<(&'a str, String)>, &'a [u8]);

/// The same with the token sent: method, path, token, headers, body.
type AuthedRequest<'a> = (
    &'a str,
    String,
    Option<&'a str>,
    Vec<(&'a str, String)>,
    &'a [u8],
);

/// A response read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn json(&self) -> Value {
        // The body may be chunked: the JSON object is what lies between the outer braces.
        let (Some(a), Some(b)) = (self.body.find('{'), self.body.rfind('}')) else {
            return Value::Null;
        };
        serde_json::from_str(&self.body[a..=b]).unwrap_or(Value::Null)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// A TLS connection to the server (HTTP/1.1 by ALPN unless `alpn` says otherwise).
async fn connect(server: &Server, alpn: &[u8]) -> TlsStream<TcpStream> {
    connect_from(server, LOCALHOST, alpn).await.unwrap()
}

const LOCALHOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// The same from another loopback address (127.0.0.0/8 is all loopback on Linux), so one test
/// can be several client addresses; an error if the server refuses the connection.
async fn connect_from(
    server: &Server,
    from: std::net::IpAddr,
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    HOSTILE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let addr = server.url.trim_start_matches("https://").to_string();
    let host = addr.rsplit_once(':').unwrap().0.to_string();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    let tcp = socket.connect(addr.parse().unwrap()).await?;
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(host).unwrap(), tcp)
        .await
}

/// Reads until the server closes (or the TLS stream ends without close_notify).
async fn read_all(s: &mut TlsStream<TcpStream>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn parse(bytes: &[u8]) -> Raw {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// One request, exactly as given (the path is not normalized or re-encoded).
async fn raw(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, String)],
    body: &[u8],
) -> Raw {
    raw_from(server, LOCALHOST, method, path, token, headers, body).await
}

/// The same from the client address `from`.
async fn raw_from(
    server: &Server,
    from: std::net::IpAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, String)],
    body: &[u8],
) -> Raw {
    let mut s = connect_from(server, from, b"http/1.1").await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("authorization: Bearer {t}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    // A server that refuses before reading the body may close while it is still being sent:
    // the response it wrote first is what counts.
    if s.write_all(req.as_bytes()).await.is_ok() && s.write_all(body).await.is_ok() {
        let _ = s.flush().await;
    }
    parse(&read_all(&mut s).await)
}

/// Every file under `dir` (relative path and size), except the server's own log, job records and
/// audit entries.
fn tree(dir: &std::path::Path) -> Vec<(String, u64)> {
    fn walk(d: &std::path::Path, root: &std::path::Path, out: &mut Vec<(String, u64)>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.file_name().map(|n| n != "server.log").unwrap_or(true)
                // Job records change on their own: a running job's progress is saved once a
                // second, whatever the requests under test do.
                && !p.to_string_lossy().contains("/records/job/")
                // The audit log records refused requests too, by design (tests/it/audit.rs
                // checks those entries).
                && !p.to_string_lossy().contains("/vault/audit/")
            {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((p.strip_prefix(root).unwrap().display().to_string(), len));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

struct World {
    _t: tempfile::TempDir,
    server: Server,
    host_a: String,
    host_b: String,
}

fn world(config: &str) -> World {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(config));
    let a = server.add_host("hv-a", None);
    let b = server.add_host("hv-b", None);
    World {
        host_a: Server::host_token(&a),
        host_b: Server::host_token(&b),
        _t: t,
        server,
    }
}

const SMALL: &str = "[vault]\nblock_size = 1048576\n";

async fn protect_vm(c: &Client, vm: &str) {
    let spec = json!({"disks": [{"id": "os", "size": 4 * MIB}]});
    let _: Value = c
        .send_json(Method::PUT, &format!("/v1/agent/vms/{vm}"), &spec)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_like_names_are_refused_and_create_nothing() {
    let w = world(SMALL);
    let a = w.server.client_with(&w.host_a);
    protect_vm(&a, "vm-a").await;
    // The whole test directory: a name that escaped the data directory would show up here.
    let before = tree(&w.server.dir);

    let long = "v".repeat(65);
    let very_long = "v".repeat(8000);
    let names = [
        "..",
        ".",
        "%2e%2e",
        "%2E%2e",
        "..%2F..%2Fetc",
        "%2e%2e%2f%2e%2e%2fetc",
        "..%5C..%5Cwindows",
        "a%2Fb",
        "vm%00",
        "%00",
        "vm%00.x",
        "vm%0Ax",
        "vm%20a",
        ".hidden",
        "-dash",
        long.as_str(),
        very_long.as_str(),
        // Not UTF-8 once decoded (overlong "..", a lone continuation byte).
        "%c0%ae%c0%ae",
        "%ff",
    ];
    let spec = serde_json::to_vec(&json!({"disks": [{"id": "os", "size": 4 * MIB}]})).unwrap();
    let block = vec![5u8; MIB as usize];
    let hash = vec![(
        "x-drvault-blake3",
        blake3::hash(&block).to_hex().to_string(),
    )];
    let done = serde_json::to_vec(&json!({"data_runs": [], "digest": ""})).unwrap();
    let op = w.server.token.clone();
    let mut wrong = Vec::new();
    for n in names {
        let cases: Vec<AuthedRequest> = vec![
            (
                "PUT",
                format!("/v1/agent/vms/{n}"),
                Some(&w.host_a),
                vec![],
                &spec,
            ),
            (
                "GET",
                format!("/v1/agent/vms/{n}"),
                Some(&w.host_a),
                vec![],
                b"",
            ),
            (
                "PUT",
                format!("/v1/agent/vms/{n}/disks/os/blocks/0"),
                Some(&w.host_a),
                hash.clone(),
                &block,
            ),
            (
                "PUT",
                format!("/v1/agent/vms/vm-a/disks/{n}/blocks/0"),
                Some(&w.host_a),
                hash.clone(),
                &block,
            ),
            (
                "POST",
                format!("/v1/agent/vms/vm-a/disks/{n}/complete"),
                Some(&w.host_a),
                vec![],
                &done,
            ),
            (
                "PUT",
                format!("/v1/agent/vms/vm-a/disks/{n}/logs/l1?cycle=1"),
                Some(&w.host_a),
                vec![],
                b"not a log",
            ),
            ("GET", format!("/v1/vms/{n}"), Some(&op), vec![], b""),
            (
                "POST",
                format!("/v1/vms/{n}/merge"),
                Some(&op),
                vec![],
                b"{}",
            ),
            (
                "GET",
                format!("/v1/vms/vm-a/disks/{n}/map"),
                Some(&op),
                vec![],
                b"",
            ),
            ("DELETE", format!("/v1/hosts/{n}"), Some(&op), vec![], b""),
        ];
        for (m, path, token, headers, body) in cases {
            let r = raw(&w.server, m, &path, token, &headers, body).await;
            let v = r.json();
            if r.status != 400 || v["code"] != "invalid_name" || v["recoverable"] != false {
                wrong.push(format!(
                    "{m} {}: {} {}",
                    &path[..path.len().min(90)],
                    r.status,
                    &r.body[..r.body.len().min(200)]
                ));
            }
        }
    }
    // Names inside JSON bodies: a host, a provider's cloud, a disk of a new VM.
    let body_cases = [
        (
            "/v1/hosts",
            Some(op.as_str()),
            json!({"name": "../evil"}),
            "invalid_name",
        ),
        (
            "/v1/providers",
            Some(op.as_str()),
            json!({"name": "p1", "cloud": "a/../b"}),
            "invalid_name",
        ),
    ];
    for (path, token, body, code) in body_cases {
        let r = raw(
            &w.server,
            "POST",
            path,
            token,
            &[("content-type", "application/json".into())],
            &serde_json::to_vec(&body).unwrap(),
        )
        .await;
        if r.status != 400 || r.json()["code"] != code {
            wrong.push(format!("POST {path} {body}: {} {}", r.status, r.body));
        }
    }
    for bad_disk in ["..", "../x", "os\u{0}", "a/b"] {
        let body = json!({"disks": [{"id": bad_disk, "size": 4 * MIB}]});
        let r = raw(
            &w.server,
            "PUT",
            "/v1/agent/vms/vm-new",
            Some(&w.host_a),
            &[("content-type", "application/json".into())],
            &serde_json::to_vec(&body).unwrap(),
        )
        .await;
        // The spec is refused as a whole; the message names the disk.
        if r.status != 400 || r.json()["code"] != "invalid_vm_spec" {
            wrong.push(format!("disk id {bad_disk:?}: {} {}", r.status, r.body));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} requests with path-like names were not refused with 400 invalid_name:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(
        tree(&w.server.dir),
        before,
        "refused names created or changed files"
    );
    // The server is still serving.
    let _: Value = a.get_json("/v1/agent/vms/vm-a").await.unwrap();
    tally("path_like_names_are_refused_and_create_nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_are_refused_with_the_json_error_body() {
    let w = world(SMALL);
    let a = w.server.client_with(&w.host_a);
    protect_vm(&a, "vm-a").await;
    let before = tree(&w.server.dir);
    let op = w.server.token.clone();
    let cases = [
        (
            "PUT",
            "/v1/agent/vms/vm-a/disks/os/logs/l1?cycle=abc",
            &w.host_a,
        ),
        (
            "PUT",
            "/v1/agent/vms/vm-a/disks/os/logs/l1?cycle=1&final=maybe",
            &w.host_a,
        ),
        (
            "GET",
            "/v1/vms/vm-a/disks/os/map?point=latest&point=c0",
            &op,
        ),
        ("GET", "/v1/jobs?vm=a&vm=b", &op),
    ];
    for (m, path, token) in cases {
        let r = raw(&w.server, m, path, Some(token), &[], b"x").await;
        let v = r.json();
        assert_eq!(
            (r.status, v["code"].as_str(), v["recoverable"].as_bool()),
            (400, Some("invalid_query"), Some(false)),
            "{m} {path}: {}",
            r.body
        );
    }
    assert_eq!(tree(&w.server.dir), before);
    tally("malformed_queries_are_refused_with_the_json_error_body");
}

/// Waits until the server closes `s` (EOF or a reset); false if it is still open at `deadline`.
/// Anything the server writes first (a 408, an error body) is read and ignored.
async fn closed_by_server(s: &mut TlsStream<TcpStream>, deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Ordinary requests keep being answered while `busy` holds; returns how many were.
async fn served_meanwhile(c: &Client, busy: impl Fn() -> bool) -> u32 {
    let mut n = 0;
    while busy() {
        let r = tokio::time::timeout(Duration::from_secs(20), c.get_json::<Value>("/v1/vms")).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "an ordinary client was not served while a slow one was connected: {r:?}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_headers_and_silent_connections_are_cut_off_while_others_are_served() {
    // Room for the slow clients below plus one ordinary one: a silent connection that kept
    // its slot would lock everyone else out.
    let w = world(
        "[vault]\nblock_size = 1048576\n\n[server]\nheader_read_timeout_s = 1\ntls_handshake_timeout_s = 1\nmax_connections = 5\nmax_connections_per_address = 5\n",
    );
    let op = w.server.operator();
    let deadline = Instant::now() + Duration::from_secs(30);
    // A header trickled a byte every 100 ms and never finished.
    let mut trickle = connect(&w.server, b"http/1.1").await;
    let trickler = tokio::spawn(async move {
        let head = b"GET /v1/vms HTTP/1.1\r\nhost: localhost\r\nx-pad: ";
        let mut sent = 0usize;
        let mut buf = [0u8; 1024];
        loop {
            let byte = head.get(sent).copied().unwrap_or(b'a');
            if trickle.write_all(&[byte]).await.is_err() || trickle.flush().await.is_err() {
                return Some(sent);
            }
            sent += 1;
            match tokio::time::timeout(Duration::from_millis(100), trickle.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(sent),
                _ if Instant::now() > deadline => return None,
                _ => {}
            }
        }
    });
    // Connections that complete TLS (HTTP/1.1 and HTTP/2 by ALPN) and then say nothing.
    let mut silent_h1 = connect(&w.server, b"http/1.1").await;
    let mut silent_h2 = connect(&w.server, b"h2").await;
    // One that never even starts TLS.
    let mut bare = TcpStream::connect(w.server.url.trim_start_matches("https://"))
        .await
        .unwrap();

    let served =
        served_meanwhile(&op, || !trickler.is_finished() && Instant::now() < deadline).await;
    let sent = trickler.await.unwrap();
    assert!(
        sent.is_some(),
        "a client trickling header bytes was never cut off"
    );
    assert!(served > 0);
    assert!(
        closed_by_server(&mut silent_h1, deadline).await,
        "a silent HTTP/1.1 connection was kept open"
    );
    assert!(
        closed_by_server(&mut silent_h2, deadline).await,
        "a silent HTTP/2 connection was kept open"
    );
    let mut buf = [0u8; 64];
    let left = deadline.saturating_duration_since(Instant::now());
    assert!(
        matches!(
            tokio::time::timeout(left, bare.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ),
        "a connection that never started TLS was kept open"
    );
    // All slots are free again: as many ordinary clients as the limit are served at once.
    let many: Vec<_> = (0..5)
        .map(|_| {
            let c = w.server.operator();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(20), c.get_json::<Value>("/v1/vms")).await
            })
        })
        .collect();
    for h in many {
        assert!(matches!(h.await.unwrap(), Ok(Ok(_))));
    }
    tally("trickled_headers_and_silent_connections_are_cut_off_while_others_are_served");
}

/// Sends `head` and then `total` body bytes in 64-byte pieces every 100 ms, until the server
/// answers or closes. Returns the response and how many body bytes went out.
async fn trickle_body(server: &Server, head: String, total: usize) -> (Raw, usize) {
    let mut s = connect(server, b"http/1.1").await;
    s.write_all(head.as_bytes()).await.unwrap();
    let mut sent = 0;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while sent < total {
        if s.write_all(&[b'7'; 64]).await.is_err() || s.flush().await.is_err() {
            break;
        }
        sent += 64;
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {}
        }
    }
    got.extend(read_all(&mut s).await);
    (parse(&got), sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_are_cut_off_store_nothing_and_others_are_served() {
    let w = world(
        "[vault]\nblock_size = 1048576\n\n[server]\nbody_min_rate_bytes_per_s = 4096\nbody_rate_grace_s = 1\n",
    );
    let a = w.server.client_with(&w.host_a);
    // Initially replicated, so that logs are accepted.
    let img = w.server.dir.join("vm-a.raw");
    raw_image(&img, 4 * MIB, &[(0, 4096)], 1);
    let creds = w.server.dir.join("hv-a.creds.json");
    w.server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "vm-a",
        "--disk",
        &format!("{}:os", img.display()),
    ]);
    let before = tree(&w.server.dir);
    let block_head = format!(
        "PUT /v1/agent/vms/vm-a/disks/os/blocks/0 HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\nx-drvault-blake3: {}\r\ncontent-length: {MIB}\r\n\r\n",
        w.host_a,
        blake3::hash(&vec![b'7'; MIB as usize]).to_hex()
    );
    let json_head = format!(
        "PUT /v1/agent/vms/vm-b HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n",
        w.host_a
    );
    let log_head = format!(
        "PUT /v1/agent/vms/vm-a/disks/os/logs/6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b?cycle=1 HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\ncontent-length: {MIB}\r\n\r\n",
        w.host_a
    );
    for (what, head, total) in [
        ("block", block_head, MIB as usize),
        ("JSON", json_head, 100_000),
        ("log", log_head, MIB as usize),
    ] {
        let server = &w.server;
        let slow = trickle_body(server, head, total);
        tokio::pin!(slow);
        // An ordinary client is served while the slow body trickles.
        let mut served = 0;
        let (r, sent) = loop {
            tokio::select! {
                out = &mut slow => break out,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    let _: Value = a.get_json("/v1/agent/vms/vm-a").await.unwrap();
                    served += 1;
                }
            }
        };
        assert!(
            sent < total,
            "{what}: the trickled body was read to its end"
        );
        assert!(
            served > 0,
            "{what}: nobody else was served meanwhile: {r:?} after {sent}"
        );
        // Cut off: an error response (the body was incomplete) or a closed connection.
        if r.status != 0 {
            let v = r.json();
            assert_eq!(
                (r.status, v["code"].as_str()),
                (400, Some("body_incomplete")),
                "{what}: {}",
                r.body
            );
        }
    }
    assert_eq!(
        tree(&w.server.dir),
        before,
        "a cut-off body stored something"
    );
    tally("trickled_bodies_are_cut_off_store_nothing_and_others_are_served");
}

const LOG_ID: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_who_is_calling() {
    let w = world(SMALL);
    let a = w.server.client_with(&w.host_a);
    protect_vm(&a, "vm-a").await;
    // A third host, removed: its token is revoked.
    let gone = Server::host_token(&w.server.add_host("hv-gone", None));
    w.server
        .operator()
        .delete("/v1/hosts/hv-gone")
        .await
        .unwrap();
    let before = tree(&w.server.dir);
    let op = w.server.token.clone();
    let operator_routes = [
        ("GET", "/v1/server".to_string()),
        ("GET", "/v1/hosts".into()),
        ("POST", "/v1/hosts".into()),
        ("DELETE", "/v1/hosts/hv-a".into()),
        ("GET", "/v1/providers".into()),
        ("POST", "/v1/providers".into()),
        ("DELETE", "/v1/providers/p1".into()),
        ("GET", "/v1/vms".into()),
        ("GET", "/v1/vms/vm-a".into()),
        ("PATCH", "/v1/vms/vm-a".into()),
        ("GET", "/v1/vms/vm-a/disks/os/map".into()),
        ("GET", "/v1/vms/vm-a/disks/os/blocks/0".into()),
        ("GET", "/v1/vms/vm-a/points".into()),
        ("PUT", "/v1/vms/vm-a/nics/0".into()),
        ("DELETE", "/v1/vms/vm-a/nics/0".into()),
        ("GET", "/v1/vms/vm-a/failover".into()),
        ("POST", "/v1/vms/vm-a/failover".into()),
        ("POST", "/v1/vms/vm-a/failover/cleanup".into()),
        ("POST", "/v1/vms/vm-a/failover/commit".into()),
        ("POST", "/v1/vms/vm-a/merge".into()),
        ("GET", "/v1/jobs".into()),
        ("GET", "/v1/jobs/00000000000000000000000000000000".into()),
        (
            "POST",
            "/v1/jobs/00000000000000000000000000000000/resume".into(),
        ),
        ("GET", "/v1/plans".into()),
        ("POST", "/v1/plans".into()),
        ("GET", "/v1/plans/p1".into()),
        ("POST", "/v1/plans/p1/failover".into()),
        ("GET", "/v1/keys".into()),
        ("POST", "/v1/keys/rotate".into()),
    ];
    // Agent routes with a body and headers that would be accepted from the right caller, so
    // that only who is calling can be the reason for a refusal.
    let spec = serde_json::to_vec(&json!({"disks": [{"id": "os", "size": 4 * MIB}]})).unwrap();
    let block = vec![3u8; MIB as usize];
    let block_hash = blake3::hash(&block).to_hex().to_string();
    let query = serde_json::to_vec(&json!({"blocks": [{"index": 0, "hash": block_hash}]})).unwrap();
    let complete = serde_json::to_vec(&json!({"data_runs": [], "digest": block_hash})).unwrap();
    let json_ct = vec![("content-type", "application/json".to_string())];
    let hashed = vec![("x-drvault-blake3", block_hash.clone())];
    let agent_routes: Vec<Request> = vec![
        ("PUT", "/v1/agent/vms/vm-a".into(), json_ct.clone(), &spec),
        ("GET", "/v1/agent/vms/vm-a".into(), vec![], b""),
        (
            "POST",
            "/v1/agent/vms/vm-a/disks/os/blocks/query".into(),
            json_ct.clone(),
            &query,
        ),
        (
            "PUT",
            "/v1/agent/vms/vm-a/disks/os/blocks/0".into(),
            hashed,
            &block,
        ),
        (
            "POST",
            "/v1/agent/vms/vm-a/disks/os/complete".into(),
            json_ct.clone(),
            &complete,
        ),
        (
            "PUT",
            format!("/v1/agent/vms/vm-a/disks/os/logs/{LOG_ID}?cycle=1"),
            vec![],
            b"HRL log bytes",
        ),
    ];
    let body: &[u8] = b"{}";
    let mut wrong = Vec::new();
    let mut check = |m: &str, path: &str, who: &str, r: Raw, want: u16| {
        let v = r.json();
        if r.status != want || v["code"].as_str().is_none() || v["recoverable"] != false {
            wrong.push(format!("{who} {m} {path}: {} {}", r.status, r.body));
        }
    };
    let all = operator_routes
        .iter()
        .map(|(m, p)| (*m, p.clone(), json_ct.clone(), body))
        .chain(agent_routes.iter().cloned());
    for (m, path, headers, body) in all {
        let r = raw(&w.server, m, &path, None, &headers, body).await;
        check(m, &path, "no token", r, 401);
        let r = raw(&w.server, m, &path, Some("drvh_forged"), &headers, body).await;
        check(m, &path, "forged token", r, 401);
        let r = raw(&w.server, m, &path, Some(&gone), &headers, body).await;
        check(m, &path, "revoked host", r, 401);
    }
    for (m, path) in &operator_routes {
        let r = raw(&w.server, m, path, Some(&w.host_a), &json_ct, body).await;
        check(m, path, "host token", r, 403);
    }
    for (m, path, headers, body) in &agent_routes {
        let r = raw(&w.server, m, path, Some(&op), headers, body).await;
        check(m, path, "operator token", r, 403);
        let r = raw(&w.server, m, path, Some(&w.host_b), headers, body).await;
        check(m, path, "host B on host A's VM", r, 403);
    }
    assert!(
        wrong.is_empty(),
        "{} requests were not refused as they should be:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(
        tree(&w.server.dir),
        before,
        "refused requests changed files (the key file included)"
    );
    tally("every_route_checks_who_is_calling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_before_they_are_stored() {
    let w = world(SMALL);
    let a = w.server.client_with(&w.host_a);
    protect_vm(&a, "vm-a").await;
    let before = tree(&w.server.dir);
    // A JSON body over 16 MiB, to an agent route and an operator route.
    let mut spec = json!({"disks": [{"id": "os", "size": 4 * MIB}]});
    spec["pad"] = Value::String("x".repeat(17 << 20));
    HOSTILE.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
    let r: Result<Value, _> = a
        .send_json(Method::PUT, "/v1/agent/vms/vm-big", &spec)
        .await;
    match r {
        Err(ClientError::Api { status, body, .. }) => {
            assert_eq!(
                (status.as_u16(), body.code.as_str()),
                (413, "body_too_large")
            );
            assert!(!body.recoverable);
        }
        other => panic!("a 17 MiB JSON body was not refused with 413: {other:?}"),
    }
    let plan = json!({"name": "p1", "groups": [["vm-a"]], "pad": "y".repeat(17 << 20)});
    let r: Result<Value, _> = w
        .server
        .operator()
        .send_json(Method::POST, "/v1/plans", &plan)
        .await;
    assert_eq!(
        r.err().and_then(|e| e.code().map(String::from)).as_deref(),
        Some("body_too_large")
    );
    // A block whose declared length is over the block size is refused from its headers alone:
    // the answer comes although not one body byte is sent.
    let mut s = connect(&w.server, b"http/1.1").await;
    let head = format!(
        "PUT /v1/agent/vms/vm-a/disks/os/blocks/0 HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\nx-drvault-blake3: {}\r\ncontent-length: {}\r\n\r\n",
        w.host_a,
        blake3::hash(b"").to_hex(),
        1u64 << 40
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("no answer to a block declared 1 TiB long")
        .unwrap();
    let r = parse(&buf[..n]);
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (400, Some("body_too_long")),
        "{}",
        r.body
    );
    assert_eq!(
        tree(&w.server.dir),
        before,
        "an oversized body stored something"
    );
    tally("oversized_bodies_are_refused_before_they_are_stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_over_its_rate_gets_429_with_retry_after_and_others_are_not_slowed() {
    let w = world(
        "[vault]\nblock_size = 1048576\n\n[server]\nhost_rate_per_s = 1.0\nhost_rate_burst = 5.0\n",
    );
    let a = w.server.client_with(&w.host_a);
    let b = w.server.client_with(&w.host_b);
    protect_vm(&a, "vm-a").await;
    protect_vm(&b, "vm-b").await;
    let mut limited = None;
    for _ in 0..20 {
        let r = raw(
            &w.server,
            "GET",
            "/v1/agent/vms/vm-a",
            Some(&w.host_a),
            &[],
            b"",
        )
        .await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = limited.expect("20 requests at once from one host were all served at 1 request/s");
    let v = r.json();
    assert_eq!(v["code"], "rate_limited");
    assert_eq!(v["recoverable"], true, "agents retry a rate limit");
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|s| s.parse().ok())
        .expect("429 without a numeric Retry-After");
    assert!(retry_after >= 1);
    // The limit is per host: host B and the operator are served meanwhile.
    for _ in 0..3 {
        let _: Value = b.get_json("/v1/agent/vms/vm-b").await.unwrap();
    }
    for _ in 0..20 {
        let _: Value = w.server.operator().get_json("/v1/vms").await.unwrap();
    }
    // Waiting as told is enough for host A.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let _: Value = a.get_json("/v1/agent/vms/vm-a").await.unwrap();
    tally("a_host_over_its_rate_gets_429_with_retry_after_and_others_are_not_slowed");
}

/// An HTTP/2 connection that sent one `GET /healthz` and then only talks PING: the h2 crate
/// answers the server's, and a task sends one of its own twice a second, as a client holding
/// the connection would.
struct HeldH2 {
    _send: h2::client::SendRequest<bytes::Bytes>,
    /// Finishes when the server has closed the connection.
    closed: tokio::task::JoinHandle<()>,
}

/// Opens a [`HeldH2`] from `from`; `None` if the server refuses it.
async fn hold_h2(server: &Server, from: std::net::IpAddr) -> Option<HeldH2> {
    let tls = connect_from(server, from, b"h2").await.ok()?;
    let (send, mut conn) = h2::client::handshake(tls).await.ok()?;
    let mut pings = conn.ping_pong()?;
    let closed = tokio::spawn(async move {
        let _ = conn.await;
    });
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if pings.ping(h2::Ping::opaque()).await.is_err() {
                return;
            }
        }
    });
    let mut send = send.ready().await.ok()?;
    let req = axum::http::Request::get("https://localhost/healthz")
        .body(())
        .unwrap();
    let (resp, _) = send.send_request(req, true).ok()?;
    let resp = resp.await.ok()?;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(piece) = body.data().await {
        let _ = body.flow_control().release_capacity(piece.ok()?.len());
    }
    Some(HeldH2 {
        _send: send,
        closed,
    })
}

/// An HTTP/1.1 keep-alive connection from `from` that sent one `GET /healthz`, read the answer
/// and went quiet.
async fn hold_h1(server: &Server, from: std::net::IpAddr) -> Option<TlsStream<TcpStream>> {
    let mut s = connect_from(server, from, b"http/1.1").await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let r = parse(&got);
        let len = r.header("content-length").and_then(|v| v.parse().ok());
        if got.windows(4).any(|w| w == b"\r\n\r\n") && len.is_some_and(|l| r.body.len() >= l) {
            assert_eq!(r.status, 200, "{}", r.body);
            return Some(s);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_hold_the_slots_and_healthz_answers_meanwhile() {
    // Six general slots, three per client address, idle connections closed after 12 s (the
    // HTTP/1.1 one after 10, the header read timeout, which hyper applies to the wait for the
    // next request too).
    let w = world(
        "[vault]\nblock_size = 1048576\n\n[server]\nmax_connections = 6\nmax_connections_per_address = 3\nidle_timeout_s = 12\n",
    );
    let ip = |last: u8| std::net::IpAddr::from([127, 0, 0, last]);
    // One address tries to take every slot with HTTP/2 connections it keeps idle.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.extend(hold_h2(&w.server, ip(1)).await);
    }
    // Others are served at once meanwhile.
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        raw_from(&w.server, ip(3), "GET", "/healthz", None, &[], b""),
    )
    .await
    .expect("/healthz took over a second while one address held idle HTTP/2 connections");
    assert_eq!(r.status, 200, "{}", r.body);
    let open = |held: &[HeldH2]| held.iter().filter(|h| !h.closed.is_finished()).count();
    let deadline = Instant::now() + Duration::from_secs(20);
    while open(&held) > 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        open(&held),
        3,
        "one address holds that many of the 6 connection slots (its share is 3)"
    );
    held.retain(|h| !h.closed.is_finished());
    // A second address takes the other three, one of them an HTTP/1.1 keep-alive connection:
    // every general slot is now held by an idle connection.
    for _ in 0..2 {
        held.push(
            hold_h2(&w.server, ip(2))
                .await
                .expect("a second address was refused a slot"),
        );
    }
    let mut held_h1 = hold_h1(&w.server, ip(2))
        .await
        .expect("a second address was refused a slot");
    // Health probes and the operator are answered at once all the same, from anywhere.
    for (from, path, token) in [
        (ip(3), "/healthz", None),
        (ip(1), "/healthz", None),
        (ip(4), "/v1/vms", Some(w.server.token.as_str())),
    ] {
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            raw_from(&w.server, from, "GET", path, token, &[], b""),
        )
        .await
        .unwrap_or_else(|_| {
            panic!("{path} from {from} took over a second while the slots were held")
        });
        assert_eq!(r.status, 200, "{path} from {from}: {}", r.body);
    }
    // An agent request finds no general slot: a clear answer to retry, not a hang.
    let r = raw_from(
        &w.server,
        ip(5),
        "GET",
        "/v1/agent/vms/vm-a",
        Some(&w.host_a),
        &[],
        b"",
    )
    .await;
    let v = r.json();
    assert_eq!(
        (r.status, v["code"].as_str(), v["recoverable"].as_bool()),
        (429, Some("connection_limit"), Some(true)),
        "{}",
        r.body
    );
    assert!(r.header("retry-after").is_some(), "{}", r.head);
    // The idle connections are closed, PINGs notwithstanding.
    let deadline = Instant::now() + Duration::from_secs(40);
    for h in held {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            tokio::time::timeout(left, h.closed).await.is_ok(),
            "an idle HTTP/2 connection was kept open"
        );
    }
    assert!(
        closed_by_server(&mut held_h1, deadline).await,
        "an idle HTTP/1.1 keep-alive connection was kept open"
    );
    // Their slots are free again: the agent request gets one (and a 404 for the VM it names).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = raw_from(
            &w.server,
            ip(5),
            "GET",
            "/v1/agent/vms/vm-a",
            Some(&w.host_a),
            &[],
            b"",
        )
        .await;
        if r.status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slots of the closed connections were not given back: {}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tally("idle_connections_cannot_hold_the_slots_and_healthz_answers_meanwhile");
}

/// A PUT of block `index` (1 MiB of `7`s) that sends its first half at once and then 8 KiB a
/// second, well above the minimum body rate, and never the end; counts itself in `started`
/// once the first half is out.
async fn slow_block_upload(
    server: &Server,
    token: &str,
    index: u64,
    started: Arc<std::sync::atomic::AtomicUsize>,
) {
    let len = MIB as usize;
    let head = format!(
        "PUT /v1/agent/vms/vm-a/disks/os/blocks/{index} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\nx-drvault-blake3: {}\r\ncontent-length: {len}\r\n\r\n",
        blake3::hash(&vec![b'7'; len]).to_hex()
    );
    let mut s = connect(server, b"http/1.1").await;
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'7'; len / 2]).await.unwrap();
    started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..(len / 2 / 8192 - 1) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if s.write_all(&[b'7'; 8192]).await.is_err() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hosts_slow_uploads_do_not_slow_another_hosts_protect() {
    // Shared with the tasks of the slow uploads.
    let w = Arc::new(world(SMALL));
    let a = w.server.client_with(&w.host_a);
    let spec = json!({"disks": [{"id": "os", "size": 16 * MIB}]});
    let _: Value = a
        .send_json(Method::PUT, "/v1/agent/vms/vm-a", &spec)
        .await
        .unwrap();
    let creds_b = w.server.dir.join("hv-b.creds.json");
    // Host B protects a 64 MiB disk of random data; how long it takes.
    let protect_b = |vm: &str, seed: u64| {
        let img = w.server.dir.join(format!("{vm}.raw"));
        raw_image(&img, 64 * MIB, &[(0, 64 * MIB as usize)], seed);
        let disk = format!("{}:os", img.display());
        let t = Instant::now();
        tokio::task::block_in_place(|| {
            w.server.cli_ok(&[
                "agent",
                "protect",
                "--creds",
                creds_b.to_str().unwrap(),
                "--vm",
                vm,
                "--disk",
                &disk,
            ])
        });
        t.elapsed()
    };
    let alone_before = protect_b("vm-b1", 1);
    // Host A starts 16 block uploads (as many as the server stores at once) and trickles them.
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow: Vec<_> = (0..16)
        .map(|i| {
            let (w, started) = (w.clone(), started.clone());
            tokio::spawn(async move { slow_block_upload(&w.server, &w.host_a, i, started).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while started.load(std::sync::atomic::Ordering::SeqCst) < 16 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 16);
    let beside_slow = protect_b("vm-b2", 2);
    for s in &slow {
        assert!(!s.is_finished(), "a slow upload ended early");
        s.abort();
    }
    let alone_after = protect_b("vm-b3", 3);
    let alone = alone_before.max(alone_after);
    eprintln!(
        "host B's protect of 64 MiB: alone {alone_before:?} and {alone_after:?}, beside 16 slow uploads of host A {beside_slow:?}"
    );
    assert!(
        beside_slow <= alone * 2,
        "host A's slow uploads slowed host B down: {beside_slow:?} against {alone:?} alone"
    );
    tally("one_hosts_slow_uploads_do_not_slow_another_hosts_protect");
}

// --- The command line in front of a user: what it says when something is wrong -------------

/// A command's standard error as text.
fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn host_add_into_an_unwritable_path_registers_nothing_and_a_retry_works() {
    let w = world(SMALL);
    let dir = &w.server.dir;
    let hosts = || w.server.cli_ok(&["host", "list", "--json"]);
    let missing = dir.join("no-such-folder").join("hv-c.creds.json");
    let o = w
        .server
        .cli(&["host", "add", "hv-c", "-o", missing.to_str().unwrap()]);
    let err = stderr_of(&o);
    assert!(!o.status.success(), "host add into a missing folder: {err}");
    assert!(
        err.contains(&format!("creating credentials file {}", missing.display())),
        "the error does not name the file: {err}"
    );
    assert!(
        !hosts().contains("hv-c"),
        "the host was registered though its token was lost: {}",
        hosts()
    );
    // The same name with a good path: registered, and the file's token works.
    let good = dir.join("hv-c.creds.json");
    w.server
        .cli_ok(&["host", "add", "hv-c", "-o", good.to_str().unwrap()]);
    assert!(hosts().contains("hv-c"));
    let token = Server::host_token(&good);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r: Result<Value, _> =
        rt.block_on(w.server.client_with(&token).get_json("/v1/agent/vms/none"));
    assert!(
        !matches!(r, Err(ClientError::Api { status, .. }) if status == 401),
        "the written token is refused: {r:?}"
    );
}

#[test]
fn listings_into_a_closed_pipe_end_quietly() {
    let w = world(SMALL);
    for args in [&["jobs"][..], &["host", "list"], &["vms"]] {
        // A pipe whose reader is already gone, as `drvault jobs | head` after head exits.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = std::process::Command::new(BIN)
            .args(args)
            .env("DRVAULT_DATA_DIR", &w.server.data_dir)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let err = stderr_of(&o);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("backtrace"),
            "drvault {args:?} into a closed pipe: {err}"
        );
        assert!(
            o.status.success() || o.status.code() == Some(141),
            "drvault {args:?} into a closed pipe ended with {}: {err}",
            o.status
        );
    }
}

#[test]
fn an_agent_gives_up_at_its_deadline_with_exit_3() {
    let w = world(SMALL);
    let dir = &w.server.dir;
    // The host's credentials, pointing at a port where nothing listens: every attempt fails
    // recoverably (connection refused).
    let mut creds: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hv-a.creds.json")).unwrap())
            .unwrap();
    creds["server"] = json!(format!("https://127.0.0.1:{}", free_port()));
    let gone = dir.join("gone.creds.json");
    std::fs::write(&gone, creds.to_string()).unwrap();
    let disk = dir.join("os.raw");
    raw_image(&disk, MIB, &[(0, 4096)], 7);
    let start = Instant::now();
    // The first back-off wait is a minute; the deadline is 2 s.
    let o = w.server.cli(&[
        "agent",
        "protect",
        "--creds",
        gone.to_str().unwrap(),
        "--vm",
        "vm-gone",
        "--disk",
        &format!("{}:os", disk.display()),
        "--backoff-scale",
        "1",
        "--give-up-after",
        "2s",
    ]);
    let took = start.elapsed();
    let err = stderr_of(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("gave up after 1 attempts over 2 s"), "{err}");
    // Generous for a loaded machine; before, it took the whole minute of the first wait.
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
    assert!(
        !err.contains('\x1b'),
        "colour codes in a captured stderr: {err:?}"
    );
}

#[test]
fn cli_errors_say_each_thing_once_and_name_what_the_operator_gave() {
    let w = world(SMALL);
    let dir = &w.server.dir;
    let creds = dir.join("hv-a.creds.json");
    let creds = creds.to_str().unwrap();
    let agent = |args: &[&str]| {
        let mut all = vec!["agent", args[0], "--creds", creds];
        all.extend_from_slice(&args[1..]);
        w.server.cli(&all)
    };
    // An agent command that must fail: its standard error.
    let refused_by_agent = |args: &[&str]| {
        let o = agent(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        stderr_of(&o)
    };
    let once = |text: &str, what: &str| {
        assert_eq!(
            text.matches(what).count(),
            1,
            "{what:?} not said once: {text}"
        );
    };

    // A disk that does not exist: its path once, and called a disk.
    let missing_disk = dir.join("missing.vhdx");
    let err = refused_by_agent(&[
        "protect",
        "--vm",
        "vm-x",
        "--disk",
        &format!("{}:os", missing_disk.display()),
    ]);
    once(&err, &missing_disk.display().to_string());
    assert!(
        err.contains(&format!("disk {}", missing_disk.display())),
        "{err}"
    );

    // A change log that does not exist is a change log, not a disk.
    let missing_log = dir.join("missing.hrl");
    let err = refused_by_agent(&[
        "replicate",
        "--vm",
        "vm-x",
        "--disk",
        "os",
        "--hrl",
        missing_log.to_str().unwrap(),
    ]);
    once(&err, &missing_log.display().to_string());
    assert!(err.contains("change log"), "{err}");
    assert!(!err.contains("disk /"), "a log called a disk: {err}");

    // The server's refusal of a log, once (the VM is not protected).
    let log = dir.join("c1.hrl");
    let id = drvault::format::hrl::Guid::new_random();
    let bytes = make_log(&[(0, vec![7u8; 4096])], id, drvault::format::hrl::Guid::NIL);
    std::fs::write(&log, bytes).unwrap();
    let err = refused_by_agent(&[
        "replicate",
        "--vm",
        "vm-x",
        "--disk",
        "os",
        "--hrl",
        log.to_str().unwrap(),
    ]);
    once(&err, "server refused");
    assert!(err.starts_with("error: replicate: server refused"), "{err}");

    // `hrl diff` of a missing file: its path once.
    let missing_raw = dir.join("before.raw");
    let o = w.server.cli(&[
        "hrl",
        "diff",
        missing_raw.to_str().unwrap(),
        missing_raw.to_str().unwrap(),
        "-o",
        dir.join("x.hrl").to_str().unwrap(),
    ]);
    let err = stderr_of(&o);
    assert!(!o.status.success());
    assert_eq!(
        err.matches(&missing_raw.display().to_string()).count(),
        1,
        "{err}"
    );

    // Export into a missing folder names the -o path, not the temporary file.
    let disk = dir.join("os.raw");
    raw_image(&disk, MIB, &[(0, 4096)], 3);
    succeeded(
        &agent(&[
            "protect",
            "--vm",
            "vm-e",
            "--disk",
            &format!("{}:os", disk.display()),
        ]),
        "protect",
    );
    let out = dir.join("no-such-folder").join("os.vhd");
    let o = w.server.export("vm-e", "os", "latest", "vhd", &out);
    let err = stderr_of(&o);
    assert!(!o.status.success());
    assert!(err.contains(&format!("writing {}", out.display())), "{err}");
    assert!(!err.contains("partial"), "the temporary name leaked: {err}");

    // Key rotation reminds the operator to back the key file up again.
    let o = w.server.cli(&["key", "rotate"]);
    succeeded(&o, "key rotate");
    assert!(
        stderr_of(&o).contains("back it up again"),
        "{}",
        stderr_of(&o)
    );
}
