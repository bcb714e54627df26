//! Compressed uploads (`Content-Encoding: zstd`): what the agent sends, what the server checks
//! and refuses.

use crate::common;

use std::io::Write;
use std::path::Path;

use common::*;
use drvault::client::{Client, ClientError};
use drvault::wire::{BlockAck, QueryBlock, ReceivedQuery, BLAKE3_HEADER, PLAIN_LENGTH_HEADER};
use reqwest::Method;
use serde_json::{json, Value};

const BLOCK_SIZE: u64 = MIB;
const CONFIG: &str = "[vault]\nblock_size = 1048576\n";

/// Disk-like content that compresses (text lines with numbers), different for each `seed`.
fn compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while v.len() < len {
        writeln!(
            v,
            "seed {seed} line {i:08}: the quick brown fox {}",
            i * 7 % 13
        )
        .unwrap();
        i += 1;
    }
    v.truncate(len);
    v
}

fn zstd(plain: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(plain, 3).unwrap()
}

fn hash(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

/// A server with one host whose VM `vm` has one 4 MiB disk `os` (1 MiB blocks) in initial
/// replication.
async fn protected(dir: &Path) -> (Server, Client) {
    let server = Server::start(dir, Some(CONFIG));
    let creds = server.add_host("hv", None);
    let c = server.client_with(&Server::host_token(&creds));
    let spec = json!({"disks": [{"id": "os", "size": 4 * MIB}]});
    let _: Value = c
        .send_json(Method::PUT, "/v1/agent/vms/vm", &spec)
        .await
        .unwrap();
    (server, c)
}

/// PUTs block `index` of `vm/os` with the given headers, as a hand-made agent would.
async fn put_block(
    c: &Client,
    index: u64,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<BlockAck, ClientError> {
    c.put_bytes(
        &format!("/v1/agent/vms/vm/disks/os/blocks/{index}"),
        headers,
        body.into(),
    )
    .await
}

/// The status and code of a refusal (panics on success).
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, body, .. }) => (status.as_u16(), body.code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Whether the server still lacks block `index` with content `plain`.
async fn still_missing(c: &Client, index: u64, plain: &[u8]) -> bool {
    let q = ReceivedQuery {
        blocks: vec![QueryBlock {
            index,
            hash: hash(plain),
        }],
    };
    c.query_blocks("vm", "os", &q).await.unwrap().missing == vec![index]
}

/// Peak resident memory of the server process (VmHWM), in bytes.
fn server_peak_rss(server: &Server) -> u64 {
    let data_dir = server.data_dir.to_str().unwrap().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let ours =
            args.iter().any(|a| *a == b"serve".as_slice()) && args.contains(&data_dir.as_bytes());
        if !ours {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        return kib * 1024;
    }
    panic!("server process for {data_dir} not found in /proc");
}

/// A zstd stream of `len` zero bytes that declares its size in the frame header: a few hundred
/// KiB that claim `len`.
fn zstd_bomb(len: u64) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    enc.set_pledged_src_size(Some(len)).unwrap();
    let zeros = vec![0u8; 8 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        enc.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    enc.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_blocks_that_lie_are_cut_off_or_bombs_are_refused_and_nothing_is_stored() {
    let t = tempfile::tempdir().unwrap();
    let (server, c) = protected(t.path()).await;
    let chunks_before = server.vault_objects("chunks");
    let stage_before = server.vault_objects("stage");
    let block0 = compressible(BLOCK_SIZE as usize, 0);
    let block1 = compressible(BLOCK_SIZE as usize, 1);
    let zstd_headers = |claimed: &[u8]| {
        vec![
            ("content-encoding", "zstd".to_string()),
            (BLAKE3_HEADER, hash(claimed)),
        ]
    };

    // Good zstd of block 1, claiming block 0's hash: checked on the plain bytes.
    let r = put_block(&c, 0, &zstd_headers(&block0), zstd(&block1)).await;
    assert_eq!(refusal(r), (400, "hash_mismatch".to_string()));

    // A frame cut in half.
    let z = zstd(&block0);
    let r = put_block(&c, 0, &zstd_headers(&block0), z[..z.len() / 2].to_vec()).await;
    assert_eq!(refusal(r), (400, "invalid_zstd".to_string()));

    // A bomb: well under a block on the wire, 4 GiB once inflated (and its header says so).
    let bomb = zstd_bomb(4 << 30);
    assert!(bomb.len() < BLOCK_SIZE as usize, "{} bytes", bomb.len());
    let r = put_block(&c, 0, &zstd_headers(&vec![0u8; BLOCK_SIZE as usize]), bomb).await;
    assert_eq!(refusal(r), (400, "decompressed_too_long".to_string()));
    let peak = server_peak_rss(&server);
    assert!(
        peak < 1 << 30,
        "the server's peak memory reached {peak} bytes refusing a 4 GiB bomb"
    );

    // The plain block with its right hash, but in an encoding the server does not take.
    let headers = [
        ("content-encoding", "br".to_string()),
        (BLAKE3_HEADER, hash(&block0)),
    ];
    match put_block(&c, 0, &headers, block0.clone()).await {
        Err(ClientError::Api { status, body, .. }) => {
            assert_eq!(
                (status.as_u16(), body.code.as_str()),
                (415, "unsupported_content_encoding")
            );
            assert!(body.message.contains("\"br\""), "{}", body.message);
            assert!(!body.recoverable);
        }
        other => panic!("an unknown Content-Encoding was not refused: {other:?}"),
    }

    assert_eq!(server.vault_objects("chunks"), chunks_before);
    assert_eq!(server.vault_objects("stage"), stage_before);
    assert!(still_missing(&c, 0, &block0).await);

    // The same block compressed and honest is taken, and stored from the agent's bytes.
    let ack = put_block(&c, 0, &zstd_headers(&block0), zstd(&block0))
        .await
        .unwrap();
    assert_eq!(ack.outcome, "stored");
    assert!(
        ack.stored_bytes < BLOCK_SIZE / 4,
        "stored {} bytes",
        ack.stored_bytes
    );
    assert!(!still_missing(&c, 0, &block0).await);
    // And a block sent as it is still works.
    let ack = put_block(&c, 1, &[(BLAKE3_HEADER, hash(&block1))], block1.clone())
        .await
        .unwrap();
    assert_eq!(ack.outcome, "stored");
}

/// `drvault agent protect` of `img` as VM `vm`, with `extra` arguments.
fn agent_protect(server: &Server, creds: &Path, vm: &str, img: &Path, extra: &[&str]) {
    let mut args = vec![
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        vm,
        "--disk",
        img.to_str().unwrap(),
        "--format",
        "raw",
    ];
    args.extend_from_slice(extra);
    server.cli_ok(&args);
}

/// The value of a counter in `/metrics` (0 when absent).
async fn counter(server: &Server, name: &str) -> u64 {
    let (body, _) = server.operator().get_bytes("/metrics").await.unwrap();
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cycle_goes_compressed_exports_exactly_and_uncompressed_still_works() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some(CONFIG));
    let creds = server.add_host("hv", None);
    let size = 8 * MIB;
    let c0 = dir.join("os-c0.raw");
    let img = dir.join("os.raw");
    std::fs::write(&c0, vec![0u8; size as usize]).unwrap();
    write_at(&c0, 0, &compressible(3 * MIB as usize, 10));
    write_at(&c0, 5 * MIB + 4096, &compressible(MIB as usize, 11));
    std::fs::copy(&c0, &img).unwrap();

    agent_protect(&server, &creds, "web", &img, &[]);
    // One cycle: compressible writes across blocks, as a log made by `hrl diff`.
    write_at(&img, MIB - 8192, &compressible(40_000, 12));
    write_at(&img, 6 * MIB, &compressible(300_000, 13));
    let log = dir.join("os-c1.hrl");
    server.cli_ok(&[
        "hrl",
        "diff",
        c0.to_str().unwrap(),
        img.to_str().unwrap(),
        "-o",
        log.to_str().unwrap(),
    ]);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "web",
        "--disk",
        "os",
        "--hrl",
        log.to_str().unwrap(),
        "--cycle",
        "1",
    ]);
    for (point, want) in [("c0", &c0), ("c1", &img)] {
        let out = dir.join(format!("export-{point}.raw"));
        server.cli_ok(&[
            "export",
            "--vm",
            "web",
            "--disk",
            "os",
            "--point",
            point,
            "--format",
            "raw",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(want).unwrap(),
            "point {point} does not export as the disk was"
        );
    }
    let blocks = counter(&server, "drvault_bytes_received_total").await;
    let logs = counter(&server, "drvault_log_bytes_accepted_total").await;
    let wire = counter(&server, "drvault_wire_bytes_received_total").await;
    let reused = counter(&server, "drvault_blocks_payload_reused_total").await;
    eprintln!(
        "compressed: {blocks} block bytes + {logs} log bytes took {wire} bytes on the wire \
         ({:.3}); {reused} chunks sealed from the agent's bytes",
        wire as f64 / (blocks + logs) as f64
    );
    assert_eq!(blocks, 4 * MIB + MIB, "the data blocks of the disk");
    assert!(logs > 340_000, "the log was counted ({logs} bytes)");
    assert!(
        wire * 3 < blocks + logs,
        "{wire} bytes on the wire for {} bytes of blocks and log",
        blocks + logs
    );
    assert_eq!(
        reused, 5,
        "every block sealed from the agent's compressed bytes"
    );

    // The switch: the same data sent as it is by another VM travels whole, and still reads back.
    let plain_img = dir.join("data.raw");
    std::fs::copy(&img, &plain_img).unwrap();
    agent_protect(&server, &creds, "plain", &plain_img, &["--no-compress"]);
    let wire_after = counter(&server, "drvault_wire_bytes_received_total").await;
    let blocks_after = counter(&server, "drvault_bytes_received_total").await;
    assert_eq!(wire_after - wire, blocks_after - blocks);
    let out = dir.join("export-plain.raw");
    server.cli_ok(&[
        "export",
        "--vm",
        "plain",
        "--disk",
        "data",
        "--format",
        "raw",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&plain_img).unwrap());
}

/// PUTs a change log of disk `os` of VM `vm` with the given headers.
async fn put_log(
    c: &Client,
    id: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<Value, ClientError> {
    c.put_bytes(
        &format!("/v1/agent/vms/vm/disks/os/logs/{id}?cycle=1"),
        headers,
        body.into(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_logs_that_lie_are_cut_off_or_bombs_are_refused_and_the_journal_is_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let (server, c) = protected(t.path()).await;
    // Finish the initial replication: block 0 holds data, the rest are zeros.
    let block0 = compressible(BLOCK_SIZE as usize, 0);
    put_block(&c, 0, &[(BLAKE3_HEADER, hash(&block0))], block0.clone())
        .await
        .unwrap();
    let digest = {
        let mut h = blake3::Hasher::new();
        h.update(blake3::hash(&block0).as_bytes());
        for _ in 1..4 {
            h.update(blake3::hash(&vec![0u8; BLOCK_SIZE as usize]).as_bytes());
        }
        h.finalize().to_hex().to_string()
    };
    let done: Value = c
        .send_json(
            Method::POST,
            "/v1/agent/vms/vm/disks/os/complete",
            &json!({"data_runs": [[0, 1]], "digest": digest}),
        )
        .await
        .unwrap();
    assert_eq!(done["state"], "complete", "{done}");
    let log_id = "6b0f4c1e-2a3d-4e5f-8a9b-0c1d2e3f4a5b";
    let log = make_log(
        &[(8192, compressible(204_800, 20))],
        log_id.parse().unwrap(),
        ZERO_GUID.parse().unwrap(),
    );
    let logs_before = server.vault_objects("logs");
    let zstd_log = |plain_len: usize| {
        vec![
            ("content-encoding", "zstd".to_string()),
            (PLAIN_LENGTH_HEADER, plain_len.to_string()),
        ]
    };

    let z = zstd(&log);
    let r = put_log(&c, log_id, &zstd_log(log.len()), z[..z.len() - 10].to_vec()).await;
    assert_eq!(refusal(r), (400, "invalid_zstd".to_string()));
    // Declared shorter than it inflates: refused once it passes the declared length.
    let r = put_log(&c, log_id, &zstd_log(log.len() / 2), z.clone()).await;
    assert_eq!(refusal(r), (400, "decompressed_too_long".to_string()));
    // A bomb declared as a small log.
    let r = put_log(&c, log_id, &zstd_log(1 << 20), zstd_bomb(1 << 30)).await;
    assert_eq!(refusal(r), (400, "decompressed_too_long".to_string()));
    // Without the plain length the server has no bound: refused before it reads the body.
    let r = put_log(
        &c,
        log_id,
        &[("content-encoding", "zstd".into())],
        z.clone(),
    )
    .await;
    assert_eq!(refusal(r), (400, "missing_plain_length".to_string()));
    let r = put_log(
        &c,
        log_id,
        &[("content-encoding", "gzip".into())],
        log.clone(),
    )
    .await;
    assert_eq!(
        refusal(r),
        (415, "unsupported_content_encoding".to_string())
    );

    assert_eq!(server.vault_objects("logs"), logs_before);
    let points = server.cli_ok(&["points", "--vm", "vm", "--json"]);
    let points: Value = serde_json::from_str(&points).unwrap();
    assert_eq!(points.as_array().unwrap().len(), 1, "only c0: {points}");

    // The honest compressed log is taken.
    let ack = put_log(&c, log_id, &zstd_log(log.len()), z).await.unwrap();
    assert_eq!(ack["cycle"], 1, "{ack}");
}
