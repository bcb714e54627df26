//! webhooks tests (issue 21): a receiver on 127.0.0.1 (a small hyper server in the test) gets
//! signed job-outcome events, retries reach it after failures, and bad `[[webhooks]]` entries
//! stop the server at start.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::common::*;

const SECRET: &str = "s3cret-for-the-test";

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Received {
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The signature a receiver that knows the secret computes: HMAC-SHA256 over the
    /// timestamp header, a dot and the body.
    fn expected_signature(&self, timestamp: &str) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(&self.body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    /// What a receiver checks: the signature matches, and the timestamp is recent.
    fn assert_signed(&self) {
        let ts = self.header("x-drvault-timestamp");
        let sent: u64 = ts.parse().unwrap_or_else(|_| panic!("timestamp {ts:?}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(sent) < 300, "timestamp {sent}, now {now}");
        assert_eq!(
            self.header("x-drvault-signature"),
            self.expected_signature(&ts)
        );
        // The timestamp is inside the MAC: the same body under another timestamp (a replay
        // with a fresh header) does not verify.
        assert_ne!(
            self.header("x-drvault-signature"),
            self.expected_signature(&(sent + 1).to_string())
        );
    }
}

/// A receiver on 127.0.0.1 that records every request and answers the statuses of `script`
/// in turn, then 200.
fn receiver(
    rt: &tokio::runtime::Runtime,
    script: Vec<u16>,
) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let g = got.clone();
    rt.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (g, script) = (g.clone(), script.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (g, script) = (g.clone(), script.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes().to_vec();
                        let n = {
                            let mut v = g.lock().unwrap();
                            v.push(Received {
                                headers: parts.headers,
                                body,
                            });
                            v.len()
                        };
                        let status = script.get(n - 1).copied().unwrap_or(200);
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"{}")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

fn config(addr: SocketAddr, events: &str) -> String {
    format!(
        "[[webhooks]]\nurl = \"http://{addr}/hook\"\nsecret = \"{SECRET}\"\nevents = {events}\n"
    )
}

/// The requests received so far whose event is `event` and whose job is `job`.
fn for_job(got: &Mutex<Vec<Received>>, event: &str, job: &str) -> Vec<Received> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|r| {
            let v = r.json();
            v["event"] == event && v["job"]["id"] == job
        })
        .cloned()
        .collect()
}

/// `drvault verify --json` on the (empty) vault: the id of its job, which succeeds.
fn run_verify(server: &Server) -> String {
    let r: Value = serde_json::from_str(&server.cli_ok(&["verify", "--json"])).unwrap();
    r["job"].as_str().unwrap().to_string()
}

fn metrics(rt: &tokio::runtime::Runtime, server: &Server) -> String {
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    rt.block_on(async {
        http.get(format!("{}/metrics", server.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
}

fn counter(metrics: &str, result: &str) -> Option<f64> {
    let prefix = format!("drvault_webhook_deliveries_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// A job that ends reaches the receiver as `job.succeeded`, with the job, signed with the
/// secret over timestamp and body, its delivery id in a header and the body.
#[test]
fn a_job_outcome_reaches_the_receiver_signed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, got) = receiver(&rt, vec![]);
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(
        t.path(),
        Some(&config(addr, r#"["job.succeeded", "job.failed"]"#)),
    );
    let job = run_verify(&server);
    let r = eventually(Duration::from_secs(60), "the verify job's event", || {
        for_job(&got, "job.succeeded", &job)
            .pop()
            .ok_or_else(|| format!("{} requests so far", got.lock().unwrap().len()))
    });
    r.assert_signed();
    let v = r.json();
    assert_eq!(r.header("x-drvault-event"), "job.succeeded");
    assert_eq!(r.header("x-drvault-delivery"), v["id"].as_str().unwrap());
    assert!(r.header("content-type").starts_with("application/json"));
    assert_eq!(v["job"]["state"], "succeeded", "{v}");
    assert!(v["at"].as_str().unwrap().ends_with('Z'), "{v}");
    assert_eq!(
        counter(&metrics(&rt, &server), "delivered").unwrap_or(0.0),
        1.0,
        "one delivery counted"
    );
}

/// A receiver that answers 500, then 503, gets the same event (same id, each attempt signed
/// anew) on the third attempt; /metrics counts two retries and one delivery.
#[test]
fn a_failing_receiver_gets_the_event_on_the_third_attempt() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, got) = receiver(&rt, vec![500, 503]);
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(&config(addr, r#"["job.succeeded"]"#)));
    // Exported before anything was sent.
    assert_eq!(counter(&metrics(&rt, &server), "retried"), Some(0.0));
    let job = run_verify(&server);
    let attempts = eventually(Duration::from_secs(60), "three attempts", || {
        let a = for_job(&got, "job.succeeded", &job);
        (a.len() >= 3)
            .then_some(a.clone())
            .ok_or_else(|| format!("{} attempts", a.len()))
    });
    let ids: Vec<String> = attempts
        .iter()
        .map(|r| r.header("x-drvault-delivery"))
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    for r in &attempts {
        r.assert_signed();
    }
    let m = eventually(Duration::from_secs(30), "the delivery counted", || {
        let m = metrics(&rt, &server);
        (counter(&m, "delivered") == Some(1.0))
            .then_some(m.clone())
            .ok_or(m)
    });
    assert_eq!(counter(&m, "retried"), Some(2.0), "{m}");
    assert_eq!(counter(&m, "failed"), Some(0.0), "{m}");
    // Delivered: nothing more is sent.
    assert_eq!(for_job(&got, "job.succeeded", &job).len(), 3);
}

/// Each bad entry stops `drvault serve` with a message naming the entry and the problem,
/// before anything is created.
#[test]
fn bad_webhook_entries_stop_the_server_at_start() {
    let t = tempfile::tempdir().unwrap();
    let hook = |url: &str, secret: &str, events: &str| {
        format!("[[webhooks]]\nurl = \"{url}\"\nsecret = \"{secret}\"\nevents = {events}\n")
    };
    let ok = hook("https://hooks.example.com/x", "s", r#"["vm.health"]"#);
    for (i, (bad, says)) in [
        (hook("not a url", "s", r#"["job.failed"]"#), "webhooks[0].url \"not a url\": not a URL"),
        (hook("http://10.1.2.3/hook", "s", r#"["job.failed"]"#), "only to a loopback address"),
        (
            format!("{ok}{}", hook("https://hooks.example.com/y", "", r#"["job.failed"]"#)),
            "webhooks[1].secret is empty",
        ),
        (hook("https://hooks.example.com/x", "s", r#"["job.done"]"#), "unknown event \"job.done\""),
        (
            "[[webhooks]]\nurl = \"https://hooks.example.com/x\"\nsecret = \"s\"\nevents = [\"vm.health\"]\nretries = 3\n".to_string(),
            "unknown field `retries`",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = t.path().join(format!("bad{i}.toml"));
        std::fs::write(&cfg, &bad).unwrap();
        let data = t.path().join(format!("data{i}"));
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A server that accepted the entry would run on: bounded wait, then kill.
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve still runs with {bad}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!status.success(), "{bad}");
        assert!(err.contains(says), "{bad}\nwanted {says:?} in: {err}");
        assert!(!data.exists(), "nothing created for {bad}");
    }
}

/// A VM whose every recovery point turns out damaged goes Critical: the receiver gets
/// `vm.health` with the level before, the new one and the findings that explain it.
#[test]
fn a_vm_health_change_reaches_the_receiver() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, got) = receiver(&rt, vec![]);
    let t = tempfile::tempdir().unwrap();
    let mut server = Server::start(t.path(), Some(&config(addr, r#"["vm.health"]"#)));
    let creds = server.add_host("hv", None);
    let img = server.dir.join("h.raw");
    raw_image(&img, MIB, &[(0, MIB as usize)], 7);
    server.protect(&creds, "h", &format!("{}:d", img.display()), &[]);
    // Restarted, the server starts comparing from the VM's level as it is now.
    server.stop();
    server.restart();
    let before: Value = serde_json::from_str(&server.cli_ok(&["vms", "h", "--json"])).unwrap();
    assert_ne!(before["health"], "Critical", "{before}");
    for k in server.vault_objects("chunks") {
        std::fs::write(server.data_dir.join("vault").join(&k), b"not a chunk").unwrap();
    }
    let o = server.cli(&["verify"]);
    assert_eq!(o.status.code(), Some(7), "verify finds the damage");
    let r = eventually(Duration::from_secs(60), "the vm.health event", || {
        let got = got.lock().unwrap();
        got.iter()
            .find(|r| r.json()["vm_health"]["health"] == "Critical")
            .cloned()
            .ok_or_else(|| format!("{} requests so far", got.len()))
    });
    r.assert_signed();
    let v = r.json();
    assert_eq!(v["event"], "vm.health");
    assert_eq!(r.header("x-drvault-event"), "vm.health");
    assert_eq!(v["vm_health"]["vm"], "h");
    assert_eq!(v["vm_health"]["previous"], before["health"], "{v}");
    let findings = v["vm_health"]["findings"].as_array().unwrap();
    assert!(findings.iter().any(|f| f["level"] == "Critical"), "{v}");
}
