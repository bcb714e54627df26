//! The OpenAPI document (issue 21): docs/openapi.json is what the code generates and what the
//! server serves, it documents every route the server has, an independent validator
//! (openapi-spec-validator) accepts it, and Schemathesis tests the live server from it: no 5xx,
//! every response's status, content type and body as documented, and no authenticated
//! operation answering without a token.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use crate::common::{raw_image, Server, MIB};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const REGENERATE: &str = "regenerate it with `cargo run -- openapi > docs/openapi.json`";

#[test]
fn committed_document_is_the_generated_one() {
    let generated = drvault::api::openapi::document_json();
    let path = repo().join("docs/openapi.json");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", path.display()));
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "docs/openapi.json differs from the document the code generates (first at line {}: \
             committed {:?}, generated {:?}); {REGENERATE}",
            line + 1,
            committed.lines().nth(line).unwrap_or("<end>"),
            generated.lines().nth(line).unwrap_or("<end>"),
        );
    }
}

/// Every `.route("PATH", method(handler)…)` in src/api with its methods.
fn routes_in_source() -> Vec<(String, String)> {
    let mut files = Vec::new();
    collect_rs(&repo().join("src/api"), &mut files);
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        // Unit tests at the end of a file build routers of their own.
        let production = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut rest = production;
        while let Some(i) = rest.find(".route(") {
            rest = &rest[i + ".route(".len()..];
            // The call's text, up to its closing parenthesis.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '(' => 1,
                        ')' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap();
            let call = &rest[..end];
            let Some(path) = call.split('"').nth(1) else {
                continue;
            };
            for m in ["get", "post", "put", "delete", "patch"] {
                let called = call.match_indices(&format!("{m}(")).any(|(at, _)| {
                    !call[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if called {
                    out.push((m.to_string(), path.to_string()));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_route_of_the_server_is_documented_and_only_those() {
    let doc: serde_json::Value =
        serde_json::from_str(&drvault::api::openapi::document_json()).unwrap();
    let mut documented = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in item.as_object().unwrap().keys() {
            documented.push((m.clone(), path.clone()));
        }
    }
    documented.sort();
    let routes = routes_in_source();
    assert!(routes.len() > 50, "found only {routes:?}");
    let missing: Vec<_> = routes.iter().filter(|r| !documented.contains(r)).collect();
    let extra: Vec<_> = documented.iter().filter(|r| !routes.contains(r)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "routes without an operation in the document (add #[utoipa::path] to the handler and \
         list it in src/api/openapi.rs): {missing:?}; operations without a route: {extra:?}"
    );
    // Only /healthz, /metrics, this document and the console's files are public.
    let public: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, item)| {
            item.as_object().unwrap().values().any(|op| {
                op.get("security").is_some_and(|s| {
                    s.as_array()
                        .unwrap()
                        .iter()
                        .any(|r| r == &serde_json::json!({}))
                })
            })
        })
        .map(|(p, _)| p.as_str())
        .collect();
    assert_eq!(
        public,
        [
            "/",
            "/console/app.css",
            "/console/app.js",
            "/console/favicon.svg",
            "/healthz",
            "/metrics",
            "/v1/openapi.json"
        ]
    );
}

/// Whether a Python module can be imported; when it cannot, the test skips outside CI (with
/// the reason) and fails in CI, where .ci/run installs it.
fn python_module(module: &str, package: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!("needs the Python package {package}; `bash .ci/run` installs it");
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    ok
}

fn output_text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn openapi_spec_validator_accepts_the_document() {
    if !python_module("openapi_spec_validator", "openapi-spec-validator") {
        return;
    }
    let o = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(repo().join("docs/openapi.json"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "validator refused it:\n{}",
        output_text(&o)
    );
}

/// A server with something to find: host hv01 with VM web01 (disk `os`) protected, the names
/// the document's examples use.
fn seeded_server(dir: &Path) -> Server {
    let server = Server::start(dir, None);
    let creds = server.add_host("hv01", None);
    let img = dir.join("os.raw");
    raw_image(&img, 4 * MIB, &[(0, 300_000), (3 * MIB, 50_000)], 7);
    server.protect(&creds, "web01", &format!("{}:os", img.display()), &[]);
    server
}

/// `schemathesis run` against the server's own /v1/openapi.json (so the served document is the
/// one tested), with `args` added.
fn schemathesis(server: &Server, dir: &Path, name: &str, args: &[&str]) -> Output {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &server.ca_pem).unwrap();
    let work = dir.join(name);
    std::fs::create_dir_all(&work).unwrap();
    let start = Instant::now();
    let o = Command::new("python3")
        .args([
            "-c",
            "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
            "run",
        ])
        .arg(format!("{}/v1/openapi.json", server.url))
        .arg("--tls-verify")
        .arg(&ca)
        // One worker: Hypothesis's example generation is not thread-safe in every path (two
        // workers once failed inside it with "AST constructor recursion depth mismatch").
        .args(["--workers", "1", "--request-timeout", "60", "--seed", "21"])
        // The server closes a keep-alive connection idle for header_read_timeout_s (10 s), which
        // generating a case can take on a loaded machine; a POST sent on it as it closes fails
        // ("EOF occurred in violation of protocol") and is not retried. A connection per request
        // leaves no idle one to close.
        .args(["--header", "Connection: close", "--request-retries", "3"])
        .args(args)
        .env(
            "PYTHONPATH",
            repo().join("tests/it/support").display().to_string(),
        )
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        // Hypothesis keeps its example database in the working directory.
        .current_dir(&work)
        .output()
        .unwrap();
    eprintln!("schemathesis {name}: {:.0?}", start.elapsed());
    o
}

/// How many operations Schemathesis should test under paths starting with `prefix`: the
/// document's, less `GET /v1/openapi.json` itself, which Schemathesis leaves out of a run it
/// loads the document from.
fn operations(prefix: &str) -> usize {
    let doc: serde_json::Value =
        serde_json::from_str(&drvault::api::openapi::document_json()).unwrap();
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(p, _)| p.starts_with(prefix) && *p != "/v1/openapi.json")
        .map(|(_, item)| item.as_object().unwrap().len())
        .sum()
}

/// Schemathesis succeeded and tested `n` operations (none skipped for want of data it could
/// generate).
fn assert_clean(o: &Output, n: usize, what: &str) {
    let text = output_text(o);
    assert!(o.status.success(), "{what}:\n{text}");
    assert!(
        text.contains(&format!("Tested: {n}\n")),
        "Schemathesis did not test all {n} operations:\n{text}"
    );
}

/// What every response must pass: no 5xx, a documented status, content type and headers, a
/// body matching its schema, and (`ignored_auth`) a success that turns into a refusal without
/// the token.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,ignored_auth";

fn max_examples() -> &'static str {
    if std::env::var_os("DRVAULT_SCHEMATHESIS_LONG").is_some() {
        "300"
    } else {
        "8"
    }
}

#[test]
fn schemathesis_finds_nothing_against_a_live_server() {
    if !python_module("schemathesis", "schemathesis") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = seeded_server(dir);

    // The served document is the generated one, and needs no token.
    let (status, served) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let anon = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        let r = anon
            .get(format!("{}/v1/openapi.json", server.url))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    });
    assert_eq!(
        status, 200,
        "GET /v1/openapi.json without a token: {served}"
    );
    assert!(
        served == drvault::api::openapi::document_json(),
        "the served document is not the generated one"
    );

    // The agent routes answer the operator token 403: the host's own token reaches them. This
    // run goes first: the operator run may remove host hv01 (DELETE /v1/hosts/{name} with its
    // example) and disable web01.
    let host = format!(
        "Authorization: Bearer {}",
        Server::host_token(&dir.join("hv01.creds.json"))
    );
    let o = schemathesis(
        &server,
        dir,
        "agent-routes",
        &[
            "--header",
            &host,
            "--include-path-regex",
            "^/v1/agent/",
            "--max-examples",
            max_examples(),
            "--checks",
            CHECKS,
        ],
    );
    assert_clean(
        &o,
        operations("/v1/agent/"),
        "Schemathesis found problems in the agent routes",
    );

    let auth = format!("Authorization: Bearer {}", server.token);
    let o = schemathesis(
        &server,
        dir,
        "with-token",
        &[
            "--header",
            &auth,
            "--max-examples",
            max_examples(),
            "--checks",
            CHECKS,
        ],
    );
    assert_clean(&o, operations("/"), "Schemathesis found problems");

    let o = schemathesis(
        &server,
        dir,
        "without-token",
        &[
            "--mode",
            "positive",
            "--phases",
            "examples,fuzzing",
            "--max-examples",
            "2",
            "--checks",
            "unauthenticated_is_refused,not_a_server_error",
        ],
    );
    assert_clean(
        &o,
        operations("/"),
        "an authenticated operation answered without a token",
    );
}
