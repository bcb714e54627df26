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
