//! Smoke tests of `drvault bench` end to end, each with a spawned server and a JSON report.
//! Their figures are timings, so none is asserted beyond being there and positive: only the
//! counts a user would check (bytes, blocks, writes, samples) and that no figure is invented.
//! `bench ingest` moves 128 MiB and takes several seconds, so it is `#[ignore]`d (run it with
//! `cargo test --test it -- --ignored bench_smoke::`) rather than passing while skipped; `bench deltas` and `bench failover` run on a 16 MiB image always,
//! `bench ingest --sparse-to` on 8 MiB of random data spread over 32 MiB.

use std::process::Command;

fn bench(args: &[&str], work: &std::path::Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_drvault"))
        .arg("bench")
        .args(args)
        .args(["--runs", "1", "--json", "--work-dir"])
        .arg(work)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ingest(work: &std::path::Path, kind: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["ingest", "--kind", kind, "--size", "64MiB", "--agents", "1"];
    args.extend_from_slice(extra);
    bench(&args, work)
}

/// The figure named `name` whose baseline description starts with `what`.
fn figure<'a>(r: &'a serde_json::Value, name: &str, what: &str) -> &'a serde_json::Value {
    r["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["figure"] == name && f["baseline_what"].as_str().unwrap().starts_with(what))
        .unwrap_or_else(|| panic!("no figure {name:?} against {what:?} in {r}"))
}

fn positive(v: &serde_json::Value) -> bool {
    v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite())
}

#[test]
#[ignore = "moves 128 MiB: cargo test --test it -- --ignored bench_smoke::"]
fn bench_ingest_smoke() {
    let work = tempfile::tempdir().unwrap();

    let z = ingest(work.path(), "zero", &["--no-baselines"]);
    let run = &z["runs"][0];
    assert_eq!(run["logical_bytes"], 64 << 20);
    assert_eq!(run["data_blocks"], 0);
    assert_eq!(run["zero_blocks"], 16);
    assert_eq!(run["sent_bytes"], 0);
    assert_eq!(run["latency_samples"], 0);
    assert!(run["latency_p50_ms"].is_null(), "no uploads, no latency");
    assert_eq!(z["baseline_medians"]["pipeline_status"], "not run");

    let r = ingest(work.path(), "random", &[]);
    let run = &r["runs"][0];
    assert_eq!(run["data_blocks"], 16);
    assert_eq!(run["sent_bytes"], 64 << 20);
    assert_eq!(run["latency_samples"], 16);
    assert!(run["server_cpu_s_per_gb"].as_f64().unwrap() > 0.0);
    assert!(run["peak_server_rss_mib"].as_f64().unwrap() > 1.0);
    assert_eq!(r["baseline_medians"]["pipeline_status"], "ok");
    assert_eq!(r["baseline_medians"]["cp_status"], "ok");
    let borg = r["baseline_medians"]["borg_status"].as_str().unwrap();
    assert!(borg == "ok" || borg.starts_with("missing"), "borg: {borg}");
    assert_eq!(r["ratios"]["mb_s_vs_borg"].is_null(), borg != "ok");
    // Random data does not compress: about one wire byte per data byte.
    let wire = run["wire_per_data_byte"].as_f64().unwrap();
    assert!(
        (0.9..1.2).contains(&wire),
        "wire bytes per data byte {wire}"
    );
    let restic = r["baseline_medians"]["restic_status"].as_str().unwrap();
    assert!(
        restic == "ok" || restic.starts_with("missing"),
        "restic: {restic}"
    );
    assert_eq!(r["ratios"]["mb_s_vs_restic"].is_null(), restic != "ok");
    // The random image is cached for the next invocation; runs leave no data behind.
    assert!(work.path().join("images/random-67108864.img").exists());
    assert!(std::fs::read_dir(work.path().join("runs"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
}

#[test]
fn bench_deltas_smoke() {
    let work = tempfile::tempdir().unwrap();
    let r = bench(
        &[
            "deltas",
            "--kind",
            "random",
            "--size",
            "16MiB",
            "--log-size",
            "1MiB",
            "--journal-logs",
            "4",
            "--journal-size",
            "1MiB",
        ],
        work.path(),
    );
    assert_eq!(r["tool"], "drvault bench deltas");
    let run = &r["runs"][0];
    // 1 MiB of 4 KiB writes and of 256 KiB extents; the journal writes 1 MiB in 4 logs.
    assert_eq!(run["scattered"]["log"]["writes"], 256);
    assert_eq!(run["extents"]["log"]["writes"], 4);
    assert_eq!(run["scattered"]["log"]["data_bytes"], 1 << 20);
    assert_eq!(run["extents"]["log"]["data_bytes"], 1 << 20);
    assert_eq!(run["journal"]["logs"], 4);
    assert_eq!(run["journal"]["data_bytes"], 1 << 20);
    assert!(run["scattered"]["blocks_rewritten"].as_u64().unwrap() >= 1);
    for p in ["scattered", "extents"] {
        for b in ["apply", "pipeline", "cp"] {
            assert_eq!(run[p][b]["status"], "ok", "{p} {b}: {run}");
        }
    }
    for (name, what) in [
        ("ack MB/s, scattered 4 KiB", "in-process pipeline"),
        ("ack MB/s, 256 KiB extents", "cp + fsync"),
        ("ack s, scattered vs extents", "ack s of the extents log"),
        ("ack -> point listed ms, scattered", "one GET /points"),
        ("merge MB/s of log, extents", "hrl apply"),
        ("merge MB/s of log, 4-log journal", "hrl apply"),
        (
            "export s, point behind 4 logs",
            "export s of the same point merged",
        ),
        ("export s, merged", "cp + fsync of the raw disk"),
        (
            "vault bytes per changed byte, merge, scattered 4 KiB",
            "1: the changed bytes written in place",
        ),
        (
            "vault bytes per changed byte, merge, 4-log journal",
            "1: the changed bytes written in place",
        ),
    ] {
        let f = figure(&r, name, what);
        assert!(positive(&f["ours"]), "{name}: {f}");
        assert!(positive(&f["baseline"]), "{name}: {f}");
        assert!(positive(&f["ratio"]), "{name}: {f}");
    }
    assert!(r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n.as_str().unwrap().contains("checked byte for byte")));
    assert!(
        r["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().starts_with("load average")),
        "the report says how loaded the machine was: {}",
        r["notes"]
    );
    assert!(std::fs::read_dir(work.path().join("runs"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
}

#[test]
fn bench_failover_smoke() {
    let work = tempfile::tempdir().unwrap();
    let r = bench(
        &["failover", "--kind", "random", "--size", "16MiB"],
        work.path(),
    );
    assert_eq!(r["tool"], "drvault bench failover");
    let run = &r["runs"][0];
    assert_eq!(run["vhd_identical"], true, "{run}");
    assert_eq!(
        run["vhd_bytes"],
        (16 << 20) + 512,
        "whole MiB plus the footer"
    );
    assert!(positive(&run["materialize_mb_s"]));
    assert!(positive(&r["protect_s"]));
    let f = figure(
        &r,
        "test failover MB/s (materialize)",
        "qemu-img convert -O vpc",
    );
    assert!(positive(&f["ours"]));
    let qemu = run["qemu_convert_sync"]["status"].as_str().unwrap();
    assert!(qemu == "ok" || qemu == "missing", "qemu-img: {run}");
    assert_eq!(
        f["ratio"].is_null(),
        qemu != "ok",
        "no ratio without the peer"
    );
    if qemu == "ok" {
        assert!(positive(&f["baseline"]) && positive(&f["ratio"]));
    }
}

/// `bench failover --azure-endpoint`: the disk goes into page blobs on Azurite, the baseline is
/// the Azure SDK for Python (azure-storage-blob, installed by .ci/run), and both report the bytes
/// their blobs hold as written: random data fills every page, so each wrote the whole 16 MiB
/// and the footer's page.
#[test]
fn bench_failover_into_page_blobs_smoke() {
    let Some(azurite) = crate::emulators::Azurite::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let r = bench(
        &[
            "failover",
            "--kind",
            "random",
            "--size",
            "16MiB",
            "--warmup",
            "0",
            "--azure-endpoint",
            &azurite.url(),
        ],
        work.path(),
    );
    let run = &r["runs"][0];
    assert_eq!(run["blob_written_bytes"], (16 << 20) + 512, "{run}");
    assert!(
        run["vhd_identical"].is_null(),
        "no local file to compare: {run}"
    );
    let f = figure(&r, "failover into page blobs MB/s", "azure-storage-blob");
    assert!(positive(&f["ours"]));
    let sdk = run["sdk_upload"]["status"].as_str().unwrap();
    assert!(sdk == "ok" || sdk == "missing", "SDK: {run}");
    if sdk == "ok" {
        assert!(positive(&f["ratio"]));
        assert_eq!(run["sdk_written_bytes"], (16 << 20) + 512, "{run}");
    }
    assert!(!r["figures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["baseline_what"].as_str().unwrap().starts_with("qemu-img")));
}

#[test]
fn bench_resync_smoke() {
    let work = tempfile::tempdir().unwrap();
    let r = bench(
        &[
            "resync", "--kind", "random", "--size", "16MiB", "--change", "1MiB",
        ],
        work.path(),
    );
    assert_eq!(r["tool"], "drvault bench resync");
    let run = &r["runs"][0];
    assert_eq!(run["changed_bytes"], 1 << 20, "{run}");
    assert_eq!(run["disk_bytes"], 16 << 20);
    // 256 scattered 4 KiB writes over the disk's four 4 MiB blocks hit every block.
    assert_eq!(run["blocks_compared"], 4, "{run}");
    assert_eq!(run["blocks_differing"], 4, "{run}");
    // Only the written 4 KiB pieces travel (writes may overlap: at most the bytes changed).
    let up = run["bytes_uploaded"].as_u64().unwrap();
    assert!(up > 0 && up <= (1 << 20) + 9 * 256, "{run}");
    assert!(positive(&run["resync_s"]));
    // The resync stored at least the 4 MiB blocks it patched (compressed random data) per
    // changed MiB: well above nothing, and a figure read from the server, not made up.
    let v = figure(
        &r,
        "vault bytes per changed byte, resync",
        "1: the changed bytes",
    );
    assert!(v["ours"].as_f64().unwrap() >= 1.0, "{v}");
    let f = figure(&r, "resync s (request to commit)", "rsync");
    let rsync = run["rsync"]["outcome"]["status"].as_str().unwrap();
    assert!(rsync == "ok" || rsync == "missing", "rsync: {run}");
    assert_eq!(
        f["ratio"].is_null(),
        rsync != "ok",
        "no ratio without the peer"
    );
}

#[test]
fn bench_ingest_sparse_smoke() {
    let work = tempfile::tempdir().unwrap();
    let r = bench(
        &[
            "ingest",
            "--kind",
            "random",
            "--size",
            "8MiB",
            "--sparse-to",
            "32MiB",
            "--gaps",
            "both",
            "--warmup-size",
            "0",
        ],
        work.path(),
    );
    assert_eq!(r["tool"], "drvault bench ingest --sparse-to");
    let spread = r["spread"].as_array().unwrap();
    assert_eq!(spread.len(), 2);
    for s in spread {
        assert_eq!(s["size"], 32 << 20);
        assert_eq!(s["data_blocks"], 2, "{s}");
    }
    let round = &r["runs"][0];
    let base = &round["base"];
    assert_eq!(
        (base["data_blocks"].clone(), base["zero_blocks"].clone()),
        (2.into(), 0.into())
    );
    for s in round["spread"].as_array().unwrap() {
        let run = &s["run"];
        // The same data blocks travel; the six blocks between them never do.
        assert_eq!(run["data_blocks"], 2, "{s}");
        assert_eq!(run["zero_blocks"], 6, "{s}");
        assert_eq!(run["sent_bytes"], base["sent_bytes"], "{s}");
        assert_eq!(run["logical_bytes"], 32 << 20);
        assert_eq!(s["read_s"].is_null(), s["gaps"] == "holes", "{s}");
    }
    let f = figure(
        &r,
        "replication s, 32.0 MiB, holes between blocks",
        "s for the 8.0 MiB image",
    );
    assert!(positive(&f["ours"]) && positive(&f["baseline"]) && positive(&f["ratio"]));
    let f = figure(
        &r,
        "replication s, 32.0 MiB, zeros, vs a plain read",
        "s to read the file",
    );
    assert!(positive(&f["ratio"]), "{f}");
    assert!(work
        .path()
        .join("images/random-8388608-spread-33554432-zeros.img")
        .exists());
}

/// Store requests per operation and bytes written, as the server's /metrics counts them.
fn store_counts(server: &crate::common::Server) -> std::collections::BTreeMap<String, u64> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let text = rt.block_on(async {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap()
            .get(format!("{}/metrics", server.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let key = if let Some(op) = series
            .strip_prefix("drvault_store_requests_total{op=\"")
            .and_then(|r| r.strip_suffix("\"}"))
        {
            op.to_string()
        } else if series == "drvault_store_bytes_written_total" {
            "bytes_written".to_string()
        } else {
            continue;
        };
        out.insert(key, value.parse::<f64>().unwrap() as u64);
    }
    out
}

/// Requests of `op` between two readings of [`store_counts`].
fn delta(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    op: &str,
) -> u64 {
    after.get(op).copied().unwrap_or(0) - before.get(op).copied().unwrap_or(0)
}

/// Each uploaded block and each resync patch costs the store what storing it takes (its chunk
/// and receipt), not a listing or a record rewrite: on Azure Blob every LIST per block is paid
/// for per 64 KiB..4 MiB sent. The bounds leave room for the once-a-second progress write and
/// the session's fixed records, on a slow machine.
#[test]
fn uploads_and_resync_patches_cost_no_store_listing_per_block() {
    use crate::common::*;
    const BLOCKS: u64 = 256;
    const BS: u64 = 64 * KIB;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some("[vault]\nblock_size = 65536\n"));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let src = dir.join("src.raw");
    raw_image(&src, BLOCKS * BS, &[(0, (BLOCKS * BS) as usize)], 1);

    let before = store_counts(&server);
    let disk = format!("{}:d", src.display());
    server.cli_ok(&[
        "agent", "protect", "--creds", c, "--vm", "web", "--disk", &disk,
    ]);
    let after = store_counts(&server);
    let (list, get) = (
        delta(&before, &after, "list"),
        delta(&before, &after, "get"),
    );
    eprintln!("protect of {BLOCKS} blocks: {after:?} - {before:?}");
    // Storing a block is a put of its chunk and of its receipt.
    assert!(
        delta(&before, &after, "put_if_absent") + delta(&before, &after, "put") >= 2 * BLOCKS,
        "every block stored: {after:?}"
    );
    assert!(
        list <= BLOCKS / 4 && get <= BLOCKS / 4,
        "protect of {BLOCKS} blocks listed {list} and read {get} objects"
    );

    // One 4 KiB write in every block, then a resync: one patch per block.
    for b in 0..BLOCKS {
        write_at(&src, b * BS + 8 * KIB, &pseudo_random(4096, 100 + b));
    }
    server.cli_ok(&["resync", "--vm", "web", "--now"]);
    let before = store_counts(&server);
    let o = server.cli(&[
        "agent",
        "resync",
        "--creds",
        c,
        "--vm",
        "web",
        "--disk",
        "d",
        "--json",
        src.to_str().unwrap(),
    ]);
    succeeded(&o, "agent resync");
    let after = store_counts(&server);
    let list = delta(&before, &after, "list");
    eprintln!("resync of {BLOCKS} blocks: {after:?} - {before:?}");
    assert!(
        delta(&before, &after, "put") >= BLOCKS,
        "a receipt per patched block: {after:?}"
    );
    assert!(
        list <= BLOCKS / 4,
        "a resync patching {BLOCKS} blocks listed {list} times"
    );
}

/// `drvault bench scale` with tiny sizes on file:// vaults: every row runs (1 and 2 servers on
/// one vault, 4 agents spread over 2 servers against 2 on one) and the table names each
/// figure with a measured number; the server-death row has a number or says why not.
#[test]
fn bench_scale_smoke() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_drvault"))
        .args([
            "bench",
            "scale",
            "--store",
            "file",
            "--kind",
            "random",
            "--size",
            "4MiB",
            "--servers",
            "1,2",
            "--agents",
            "3",
            "--fleet-agents",
            "4",
            "--fleet-servers",
            "2",
            "--single-agents",
            "2",
            "--fleet-size",
            "2MiB",
            "--lease-ttl",
            "5",
            "--runs",
            "1",
            "--work-dir",
        ])
        .arg(work.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench scale failed: {}\n{table}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The figure's own value: the second column of its row.
    let value = |name: &str| -> f64 {
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name:?} in:\n{table}"));
        let v = row.split('|').nth(1).unwrap().trim();
        v.parse()
            .unwrap_or_else(|_| panic!("row {name:?} has no number ({v:?}):\n{table}"))
    };
    for name in [
        "aggregate MB/s, 1 server(s)",
        "aggregate MB/s, 2 server(s)",
        "server CPU s/GB (sum), 1 server(s)",
        "server CPU s/GB (sum), 2 server(s)",
        "peak RSS MiB, server 1 of 2",
        "peak RSS MiB, server 2 of 2",
        "fleet MB/s, 4 agents on 2 servers",
        "fleet peak RSS MiB, largest of 2 servers",
        "peak RSS MiB, 1 server with 2 agents",
    ] {
        let v = value(name);
        assert!(v > 0.0 && v.is_finite(), "{name}: {v}\n{table}");
    }
    assert!(
        table.contains("1 server, same run") && table.contains("2 agents on 1 server"),
        "the rows name their baselines:\n{table}"
    );
    assert!(table.contains("load average"), "{table}");
    let death = "seconds from a server's death to all its VMs replicating again";
    assert!(
        table.contains(death)
            || table.contains("server death: not available: leases not in this build"),
        "the server-death figure is there or says why not:\n{table}"
    );
    if table.contains(death) {
        assert!(value(death) > 0.0, "{table}");
    }
}
