//! End to end with the vault on Azure Blob Storage (Azurite): a disk with data, explicit zeros
//! and holes is protected; MS-HRL logs made by `drvault hrl diff` (sent by `agent replicate`)
//! and by the library writer are replicated; every recovery point exports byte-exact, also after
//! a server restart on the same container and after a merge; a test and an unplanned failover
//! materialize fixed VHDs that `qemu-img compare` finds identical to the expected images; and bad
//! logs, a log that breaks the chain and an upload cut off midway leave the journal, the points
//! and the container unchanged.
//!
//! Azurite comes from `npm ci` (package.json pins it). As in the store conformance suite, a
//! missing Azurite fails the tests, unless `DRVAULT_SKIP_AZURITE=1` turns that into a loud
//! SKIPPED line.

use crate::common;
use crate::emulators;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use drvault::client::Client;
use drvault::format::hrl::Guid;
use emulators::Azurite;
use reqwest::Method;
use serde_json::Value;

const CONTAINER: &str = "drvault-e2e";
/// Small blocks so a 16 MiB disk has 64 of them: holes, zero and data blocks side by side.
const BLOCK: u64 = 256 * KIB;

/// A GUID with a readable number in it, as text (for the CLI) and parsed (for the writer).
fn gid(n: u32) -> (String, Guid) {
    let s = format!("{n:08x}-0000-4000-8000-0000000e2e00");
    let g = s.parse().unwrap_or_else(|e| panic!("{s}: {e:?}"));
    (s, g)
}

fn copy(from: &Path, to: &Path) -> PathBuf {
    std::fs::copy(from, to).unwrap();
    to.to_path_buf()
}

fn point_ids(server: &Server, vm: &str) -> Vec<String> {
    let points: Value =
        serde_json::from_str(&server.cli_ok(&["points", "--vm", vm, "--json"])).unwrap();
    points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

fn export(server: &Server, vm: &str, disk: &str, point: &str, format: &str, out: &Path) {
    succeeded(&server.export(vm, disk, point, format, out), "export");
}

/// Exports every `(point, expected raw image)` as raw and insists on identical bytes.
fn check_points(server: &Server, vm: &str, disk: &str, expected: &[(&str, &Path)]) {
    let out = server.dir.join("export.raw");
    for (point, image) in expected {
        export(server, vm, disk, point, "raw", &out);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(image).unwrap(),
            "point {point} of {vm}/{disk} differs from {}",
            image.display()
        );
    }
}

/// `hrl diff old new` with explicit ids, then `agent replicate` of the log; returns the ack.
fn diff_and_replicate(
    server: &Server,
    creds: &Path,
    (old, new): (&Path, &Path),
    (prev, id): (&str, &str),
    extra: &[&str],
) -> Value {
    let log = server.dir.join(format!("{id}.hrl"));
    server.cli_ok(&[
        "hrl",
        "diff",
        old.to_str().unwrap(),
        new.to_str().unwrap(),
        "-o",
        log.to_str().unwrap(),
        "--previous-id",
        prev,
        "--unique-id",
        id,
    ]);
    let mut args = vec![
        "agent",
        "replicate",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "app",
        "--disk",
        "d",
        "--hrl",
        log.to_str().unwrap(),
        "--json",
        // A server it cannot reach fails the test in a minute instead of a day of retries.
        "--give-up-after",
        "60s",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&server.cli_ok(&args)).unwrap()
}

/// A 16 MiB dynamic VHDX written by qemu-io: pattern data across block boundaries, 2 MiB of
/// explicit zeros (allocated, all zero), a partial block, a sector near the end, and
/// unallocated holes everywhere else. Returns it and the same disk as raw.
fn source_disk(dir: &Path) -> (PathBuf, PathBuf) {
    let vhdx = dir.join("src.vhdx");
    let v = vhdx.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=1M",
            v,
            "16M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0xab 0 1536k",
            "-c",
            "write -P 0 4M 2M",
            "-c",
            "write -P 0x5c 9220k 12k",
            "-c",
            "write -P 0x01 15872k 4k",
            v,
        ],
    );
    let raw = dir.join("v0.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            v,
            raw.to_str().unwrap(),
        ],
    );
    (vhdx, raw)
}

/// The failover output directory `failover show` names for `vm`, and its record.
fn failover_dir(server: &Server, vm: &str) -> (Value, PathBuf) {
    let v: Value =
        serde_json::from_str(&server.cli_ok(&["failover", "show", "--vm", vm, "--json"])).unwrap();
    let dir = PathBuf::from(v["record"]["output_dir"].as_str().unwrap());
    (v, dir)
}

fn assert_vhd_is(vhd: &Path, raw: &Path) {
    assert_eq!(qemu_virtual_size(vhd, "vpc"), 16 * MIB, "{}", vhd.display());
    assert!(
        qemu_identical(vhd, "vpc", raw, "raw"),
        "qemu-img compare: {} differs from {}",
        vhd.display(),
        raw.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_restart_merge_and_fail_over_with_the_vault_on_azurite() {
    let Some(az) = Azurite::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let config = az.vault_config(CONTAINER, &format!("block_size = {BLOCK}\n"));
    // The server creates the container itself (vault.create_container).
    let server = Server::start(&dir, Some(&config));
    assert!(
        server
            .log()
            .contains("created container       az://drvault-e2e"),
        "{}",
        server.log()
    );
    assert!(
        !server.data_dir.join("vault").exists(),
        "nothing of the vault is kept locally"
    );
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();

    let (vhdx, v0) = source_disk(&dir);
    let summary: Value = serde_json::from_str(&server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        c,
        "--vm",
        "app",
        "--disk",
        &format!("{}:d", vhdx.display()),
        "--json",
    ]))
    .unwrap();
    assert_eq!(summary["state"], "protected", "{summary}");
    // 1.5 MiB + one partial block + one sector hold data: 8 of 64 blocks; the explicit zeros
    // and the holes are not sent.
    let d = &summary["disks"][0];
    assert_eq!(d["zero_blocks"], 56, "{summary}");
    assert!(
        d["uploaded_bytes"].as_u64().unwrap() <= 8 * BLOCK,
        "{summary}"
    );

    // Cycle 1 (hrl diff + agent): random data into a hole across two blocks, a data block
    // zeroed, the last data sector rewritten.
    let v1 = copy(&v0, &dir.join("v1.raw"));
    write_at(&v1, 2 * MIB + 512, &pseudo_random(300_000, 1));
    write_at(&v1, 512 * KIB, &[0u8; 256 * 1024]);
    write_at(&v1, 15872 * KIB, &pseudo_random(4096, 2));
    let g0 = Guid::NIL.to_string();
    let (g1s, g1) = gid(1);
    let ack = diff_and_replicate(&server, &creds, (&v0, &v1), (&g0, &g1s), &[]);
    assert_eq!(
        (ack["status"].as_str(), ack["cycle"].as_u64()),
        (Some("accepted"), Some(1))
    );

    // Cycle 2 (library writer, straight to the API): overlapping random and zero writes.
    let v2 = copy(&v1, &dir.join("v2.raw"));
    let writes = random_writes(2000, 16 * MIB, 40);
    for (off, data) in &writes {
        write_at(&v2, *off, data);
    }
    let (g2s, g2) = gid(2);
    let host = server.client_with(&Server::host_token(&creds));
    let ack = send_log(&host, "app", "d", &make_log(&writes, g2, g1), g2, None)
        .await
        .unwrap();
    assert_eq!(
        (ack["status"].as_str(), ack["cycle"].as_u64()),
        (Some("accepted"), Some(2))
    );

    assert_eq!(point_ids(&server, "app"), ["c0", "c1", "c2"]);
    check_points(
        &server,
        "app",
        "d",
        &[("c0", &v0), ("c1", &v1), ("c2", &v2), ("latest", &v2)],
    );
    let vhd = dir.join("c1.vhd");
    export(&server, "app", "d", "c1", "vhd", &vhd);
    assert_vhd_is(&vhd, &v1);

    // Everything lives in the container: the vault's key check, chunks, maps, records, logs.
    let objects = az.objects(CONTAINER).await;
    for prefix in ["vault/keycheck", "chunks/", "maps/", "records/", "logs/"] {
        assert!(
            objects.iter().any(|(k, _)| k.starts_with(prefix)),
            "no {prefix} in the container: {objects:?}"
        );
    }

    // Restart on the same container: the points and their contents are all there, and the
    // chain continues from the last log.
    let server = server.restart_clean(Some(&config));
    assert_eq!(point_ids(&server, "app"), ["c0", "c1", "c2"]);
    check_points(
        &server,
        "app",
        "d",
        &[("c0", &v0), ("c1", &v1), ("c2", &v2)],
    );

    // Cycle 3 (hrl diff + agent, app-consistent) after the restart: zeros across a block
    // boundary, data into the trailing hole.
    let v3 = copy(&v2, &dir.join("v3.raw"));
    write_at(&v3, 3 * MIB - 4096, &vec![0u8; 2 * 4096 + 512]);
    write_at(&v3, 16 * MIB - 8192, &pseudo_random(8192, 3));
    let (g3s, _) = gid(3);
    let ack = diff_and_replicate(
        &server,
        &creds,
        (&v2, &v3),
        (&g2s, &g3s),
        &["--app-consistent"],
    );
    assert_eq!(
        (ack["status"].as_str(), ack["cycle"].as_u64()),
        (Some("accepted"), Some(3))
    );
    assert_eq!(point_ids(&server, "app"), ["c0", "c1", "c2", "c3"]);

    // Merge through c1: c0 goes, the remaining points read the same.
    let out = server.cli_ok(&["merge", "--vm", "app", "--through", "c1"]);
    assert!(out.contains("merged 1 logs"), "{out}");
    assert_eq!(point_ids(&server, "app"), ["c1", "c2", "c3"]);
    check_points(
        &server,
        "app",
        "d",
        &[("c1", &v1), ("c2", &v2), ("c3", &v3), ("latest-app", &v3)],
    );
    let gone = server.cli(&[
        "export",
        "--vm",
        "app",
        "--disk",
        "d",
        "--point",
        "c0",
        "--format",
        "raw",
        "-o",
        dir.join("gone.raw").to_str().unwrap(),
    ]);
    assert!(
        !gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("point_not_found"),
        "c0 was merged away"
    );

    // Test failover at the latest point, then cleanup.
    server.cli_ok(&["failover", "--vm", "app", "--kind", "test"]);
    let (v, drill) = failover_dir(&server, "app");
    assert_eq!(v["record"]["point"], "c3", "{v}");
    assert_vhd_is(&drill.join("d.vhd"), &v3);
    let out = server.cli_ok(&["failover", "cleanup", "--vm", "app"]);
    assert!(out.contains("drill successful: true"), "{out}");
    assert!(!drill.exists(), "cleanup removes what the drill created");

    // Unplanned failover to an earlier point.
    server.cli_ok(&[
        "failover",
        "--vm",
        "app",
        "--kind",
        "unplanned",
        "--point",
        "c2",
    ]);
    let (v, out_dir) = failover_dir(&server, "app");
    assert_eq!(
        (v["record"]["point"].as_str(), v["record"]["state"].as_str()),
        (Some("c2"), Some("succeeded")),
        "{v}"
    );
    assert_vhd_is(&out_dir.join("d.vhd"), &v2);

    // The failover record is in the vault too: another restart still shows it.
    let server = server.restart_clean(Some(&config));
    let (v, _) = failover_dir(&server, "app");
    assert_eq!(v["record"]["point"], "c2", "{v}");
    // The log holds every start in turn: only the first created the container.
    assert_eq!(
        server.log().matches("created container").count(),
        1,
        "the later starts found the container: {}",
        server.log()
    );
}

/// What a refused log must not change: the whole container (every blob and its size), and the
/// disk and points as the API shows them.
async fn snapshot(az: &Azurite, op: &Client) -> (Vec<(String, u64)>, Value, Value) {
    let vm: Value = op.get_json("/v1/vms/app").await.unwrap();
    let points: Value = op.get_json("/v1/vms/app/points").await.unwrap();
    (az.objects(CONTAINER).await, vm["disks"].clone(), points)
}

/// A request body that sends `first`, then waits for `go` and fails: an upload cut off midway.
fn cut_off_body(first: Bytes, go: tokio::sync::oneshot::Receiver<()>) -> reqwest::Body {
    let stream = futures_util::stream::unfold((Some(first), Some(go)), |(first, go)| async move {
        if let Some(b) = first {
            return Some((Ok(b), (None, go)));
        }
        let go = go?;
        let _ = go.await;
        Some((
            Err(std::io::Error::other("agent lost its connection")),
            (None, None),
        ))
    });
    reqwest::Body::wrap_stream(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logs_on_azurite_change_nothing() {
    let Some(az) = Azurite::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let config = format!(
        "{}[ingest]\nmax_log_bytes = 3145728\n",
        az.vault_config(CONTAINER, "block_size = 65536\n")
    );
    let server = Server::start(&dir, Some(&config));
    let creds = server.add_host("hv", None);
    let size = 4 * MIB;
    let img = dir.join("d.raw");
    raw_image(&img, size, &[(0, 200_000), (3 * MIB, 100_000)], 1);
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "app",
        "--disk",
        &format!("{}:d", img.display()),
    ]);
    let host = server.client_with(&Server::host_token(&creds));
    let op = server.operator();
    let (_, g1) = gid(1);
    let (_, g2) = gid(2);
    let first = vec![(4096, pseudo_random(8192, 5))];
    let good1 = make_log(&first, g1, Guid::NIL);
    assert_eq!(
        send_log(&host, "app", "d", &good1, g1, None).await.unwrap()["cycle"],
        1
    );
    let mut model = std::fs::read(&img).unwrap();
    model[4096..4096 + 8192].copy_from_slice(&first[0].1);
    let before = snapshot(&az, &op).await;

    let next = make_log(
        &[(8192, vec![2u8; 4096]), (size - 1024, vec![3u8; 1024])],
        g2,
        g1,
    );
    let eol = u64::from_le_bytes(next[44..52].try_into().unwrap()) as usize;
    let mut flipped = next.clone();
    flipped[eol - 4096 + 32 + 2] ^= 1;
    let cases: Vec<(&str, Vec<u8>, Guid, &str)> = vec![
        (
            "truncated",
            next[..next.len() - 100].to_vec(),
            g2,
            "invalid_log",
        ),
        ("flipped bit in an entry", flipped, g2, "invalid_log"),
        (
            "extent past the disk end",
            make_log(&[(size, vec![1u8; 512])], g2, g1),
            g2,
            "invalid_log",
        ),
        (
            "URL names another log",
            next.clone(),
            gid(3).1,
            "log_id_mismatch",
        ),
        (
            "larger than the configured maximum",
            make_log(&[(0, pseudo_random(3 * MIB as usize, 6))], g2, g1),
            g2,
            "log_too_large",
        ),
    ];
    for (what, log, id, code) in &cases {
        let (st, c, _) = refused(send_log(&host, "app", "d", log, *id, None).await);
        assert_eq!(c, *code, "{what}");
        assert!(st.is_client_error(), "{what}: {st}");
        assert!(
            snapshot(&az, &op).await == before,
            "{what}: the container, the journal or the points changed"
        );
    }

    // An upload cut off after 1.5 MiB: its first frame reaches the container while the body
    // is still coming; once the connection breaks, it is gone again and nothing was applied.
    let big = make_log(
        &[
            (0, pseudo_random(MIB as usize, 7)),
            (2 * MIB, pseudo_random(MIB as usize, 8)),
        ],
        g2,
        g1,
    );
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    let body = cut_off_body(Bytes::copy_from_slice(&big[..3 * MIB as usize / 2]), go_rx);
    let upload = tokio::spawn({
        let host = host.clone();
        let len = big.len() as u64;
        async move {
            host.send_stream::<Value>(
                Method::PUT,
                &format!("/v1/agent/vms/app/disks/d/logs/{g2}"),
                body,
                Some(len),
            )
            .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while az.objects(CONTAINER).await.len() == before.0.len() {
        assert!(
            Instant::now() < deadline,
            "no frame of the upload reached the container: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = go_tx.send(());
    assert!(
        upload.await.unwrap().is_err(),
        "a cut-off upload is not accepted"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = snapshot(&az, &op).await;
        if now == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut-off upload left the container changed:\nbefore {:?}\nnow {:?}",
            before.0,
            now.0
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A log that breaks the chain (its predecessor is not the last log) is refused and marks
    // the disk resync-required; the journal, the points and the stored logs stay as they were.
    let (_, g9) = gid(9);
    let fork = make_log(&[(0, vec![9u8; 512])], g9, gid(7).1);
    assert_eq!(
        refused(send_log(&host, "app", "d", &fork, g9, None).await).1,
        "chain_broken"
    );
    let after = snapshot(&az, &op).await;
    let non_records = |objs: &[(String, u64)]| -> Vec<(String, u64)> {
        objs.iter()
            .filter(|(k, _)| !k.starts_with("records/"))
            .cloned()
            .collect()
    };
    assert_eq!(
        non_records(&after.0),
        non_records(&before.0),
        "only records changed"
    );
    assert_eq!(after.2, before.2, "points unchanged");
    assert_eq!(
        after.1[0]["journal_length"], before.1[0]["journal_length"],
        "journal unchanged"
    );
    assert!(after.1[0]["resync_required"].is_string(), "{}", after.1);
    check_points(
        &server,
        "app",
        "d",
        &[("latest", &write_model(&dir, &model))],
    );

    // All of it holds after a restart on the same container.
    let server = server.restart_clean(Some(&config));
    let op = server.operator();
    let again = snapshot(&az, &op).await;
    assert_eq!(again.2, before.2, "points after the restart");
    assert_eq!(again.1[0]["journal_length"], before.1[0]["journal_length"]);
    assert!(again.1[0]["resync_required"].is_string(), "{}", again.1);
    check_points(
        &server,
        "app",
        "d",
        &[("c0", &img), ("c1", &write_model(&dir, &model))],
    );
}

fn write_model(dir: &Path, model: &[u8]) -> PathBuf {
    let p = dir.join("model.raw");
    std::fs::write(&p, model).unwrap();
    p
}

/// `vault.create_container` means an Azure container; on another backend it is refused at start
/// instead of silently doing nothing.
#[test]
fn create_container_on_a_local_vault_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "[vault]\nurl = \"file://{}/vault\"\ncreate_container = true\n",
            t.path().display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(t.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "started: {err}");
    assert!(
        err.contains("vault.create_container applies to az:// vaults"),
        "{err}"
    );
}
