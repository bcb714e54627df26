//! What a server refuses at start, and agents that follow several server URLs (issue 19).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use drvault::chunk::{ChunkStore, CpuPool, KeyRing};
use drvault::file_formats::ObjectKind;
use drvault::store::Store;
use drvault::vault::{layout, Records};

use crate::common::{self, raw_image, Rng, Server, BIN, MIB, ZERO_GUID};

/// Every file of a vault directory: size and modification time, by path.
fn vault_tree(root: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, SystemTime)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                walk(&e.path(), out);
            } else {
                out.insert(e.path(), (m.len(), m.modified().unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, &mut out);
    out
}

/// Runs `drvault serve` on `dir/data` (with `config`), which must refuse to start: its exit
/// status and stderr. A server that starts instead fails the test (it is killed).
fn refused_start(dir: &Path, config: Option<&str>) -> (ExitStatus, String) {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--listen")
        .arg("127.0.0.1:0");
    if let Some(c) = config {
        let p = dir.join("refused.toml");
        std::fs::write(&p, c).unwrap();
        cmd.arg("--config").arg(p);
    }
    let err = dir.join("refused.stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, std::fs::read_to_string(&err).unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "drvault serve did not refuse to start within a minute: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a refused start: non-zero exit, `problem` on stderr, the vault tree unchanged.
/// Returns stderr.
fn assert_refused(dir: &Path, config: Option<&str>, vault: &Path, problem: &str) -> String {
    let before = vault_tree(vault);
    let (st, stderr) = refused_start(dir, config);
    assert!(!st.success(), "server exited with {st}: {stderr}");
    assert!(
        stderr.contains(problem),
        "stderr does not say {problem:?}: {stderr}"
    );
    assert!(
        vault_tree(vault) == before,
        "the refused start changed the vault ({problem})"
    );
    stderr
}

/// Runs `f` on the sealed objects of a local vault, opened with the key file `key`.
fn with_chunks<T>(vault: &Path, key: &Path, f: impl AsyncFnOnce(ChunkStore) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::open(&format!("file://{}", vault.display()), &[]).unwrap();
        let keys = Arc::new(KeyRing::load(key).unwrap());
        f(ChunkStore::new(store, keys, CpuPool::new(1), 1)).await
    })
}

/// Runs `f` on the versioned records of a local vault.
fn with_records<T>(vault: &Path, key: &Path, f: impl AsyncFnOnce(Records) -> T) -> T {
    with_chunks(vault, key, async |c| f(Records::new(c)).await)
}

/// Writes the vault's format record, as a newer (or broken) release would.
fn set_format(vault: &Path, key: &Path, value: serde_json::Value) {
    with_records(vault, key, async |r| {
        r.update(&layout::vault_format(), |_: Option<&serde_json::Value>| {
            Ok(Some(value.clone()))
        })
        .await
        .unwrap();
    });
}

/// A server that ran once on `dir` and was killed: its vault directory. (Killed, not
/// stopped: a SIGTERM this early may come before the server listens for it.)
fn stopped_server(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    Server::start(dir, None).kill();
    dir.join("data/vault")
}

#[test]
fn a_server_with_another_master_key_refuses_a_shared_vault_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    // The first server stopped: its own background writes must not count as the second's.
    let vault = stopped_server(&t.path().join("a"));
    // The second server has its own data directory, so its own (new) master key.
    let config = format!("[vault]\nurl = \"file://{}\"\n", vault.display());
    let stderr = assert_refused(
        &t.path().join("b"),
        Some(&config),
        &vault,
        "the master key file does not open this vault",
    );
    assert!(stderr.contains("wrong key file for this vault"), "{stderr}");
}

#[test]
fn a_vault_of_a_newer_format_is_refused_before_anything_is_written() {
    let t = tempfile::tempdir().unwrap();
    let vault = stopped_server(t.path());
    set_format(
        &vault,
        &t.path().join("data/master.key"),
        serde_json::json!({"vault_format": 99}),
    );
    assert_refused(
        t.path(),
        None,
        &vault,
        "vault format 99 is newer than this drvault (reads up to 2): upgrade drvault on this machine",
    );
}

#[test]
fn a_vault_of_a_too_old_or_unreadable_format_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let vault = stopped_server(t.path());
    let key = t.path().join("data/master.key");
    set_format(&vault, &key, serde_json::json!({"vault_format": 0}));
    assert_refused(
        t.path(),
        None,
        &vault,
        "vault format 0 is older than any this drvault can upgrade",
    );
    set_format(&vault, &key, serde_json::json!({"vault_format": "two"}));
    assert_refused(
        t.path(),
        None,
        &vault,
        "the vault's format number cannot be read",
    );
    // A format this release serves again: the same vault starts.
    set_format(&vault, &key, serde_json::json!({"vault_format": 2}));
    Server::start(t.path(), None).kill();
}

#[test]
fn a_format_1_vault_is_upgraded_to_2_at_start() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/old-vault-v1");
    let t = tempfile::tempdir().unwrap();
    let vault = t.path().join("data/vault");
    let key = t.path().join("data/master.key");
    std::fs::create_dir_all(t.path().join("data")).unwrap();
    common::run(
        "cp",
        &[
            "-a",
            fixture.join("vault").to_str().unwrap(),
            t.path().join("data").to_str().unwrap(),
        ],
    );
    std::fs::copy(fixture.join("master.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let keycheck = std::fs::read(vault.join("vault/keycheck")).unwrap();
    let format = |vault: &Path| {
        with_records(vault, &key, async |r| {
            r.load::<serde_json::Value>(&layout::vault_format())
                .await
                .unwrap()
                .map(|v| v.value)
        })
    };
    assert_eq!(format(&vault), None, "the fixture has no format record");
    let created = with_chunks(&vault, &key, async |c| {
        let plain = c
            .get_sealed(ObjectKind::Record, &layout::key_check())
            .await
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&plain).unwrap()
    });
    assert_eq!(
        created["vault_format"], 1,
        "the fixture was created at format 1"
    );

    Server::start(t.path(), None).kill();
    let rec = format(&vault).expect("the start recorded the format");
    assert_eq!(
        (&rec["vault_format"], &rec["upgraded_from"]),
        (&serde_json::json!(2), &serde_json::json!(1)),
        "{rec}"
    );
    assert_eq!(
        std::fs::read(vault.join("vault/keycheck")).unwrap(),
        keycheck,
        "the key check changed"
    );
    // The upgraded vault starts again and is not upgraded twice.
    Server::start(t.path(), None).kill();
    assert_eq!(record_versions(&vault, "records/vault/format"), 1);
}

/// How many versions of a record the vault holds.
fn record_versions(vault: &Path, prefix: &str) -> usize {
    vault_tree(&vault.join(prefix)).len()
}

/// Credentials whose first URL is a closed loopback port and whose `servers` holds the real
/// server: the agent protects and replicates a VM through the second URL.
#[test]
fn the_agent_uses_the_next_server_url_when_the_first_is_unreachable() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), None);
    let creds = server.add_host("hv01", None);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
    c["servers"] = serde_json::json!([c["server"].clone()]);
    c["server"] = serde_json::json!(closed);
    std::fs::write(&creds, serde_json::to_vec_pretty(&c).unwrap()).unwrap();

    let agent = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(["agent"])
            .args(args)
            .args(["--creds", creds.to_str().unwrap(), "--give-up-after", "60s"])
            .env("DRVAULT_BACKOFF_SCALE", "0.001")
            .env("RUST_LOG", "info")
            .current_dir(t.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        common::succeeded(&o, &format!("drvault agent {args:?}"));
        stderr
    };
    let os = t.path().join("os.raw");
    raw_image(
        &os,
        8 * MIB,
        &[(0, MIB as usize), (5 * MIB, 2 * MIB as usize)],
        19,
    );
    let os_arg = os.to_str().unwrap().to_string();
    let stderr = agent(&["protect", "--vm", "web01", "--disk", &os_arg]);
    assert!(
        stderr.contains("switching to another drvault server") && stderr.contains(&closed),
        "the switch is not logged: {stderr}"
    );
    let c1 = t.path().join("os-c1.raw");
    let log = t.path().join("os-c1.hrl");
    common::next_cycle(&mut Rng(7), &os, &c1, &log, ZERO_GUID, 20, 256 * 1024);
    agent(&[
        "replicate",
        "--vm",
        "web01",
        "--disk",
        "os",
        "--hrl",
        log.to_str().unwrap(),
        "--cycle",
        "1",
    ]);
    server.export_os_equals("web01", "c1", &c1, t.path());
    server.export_os_equals("web01", "c0", &os, t.path());
}
