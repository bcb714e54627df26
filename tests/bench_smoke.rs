//! Smoke test of `drvault bench ingest` end to end: spawned server, one agent, a 64 MiB zero
//! image and a 64 MiB random one, JSON report. It moves real data and takes several seconds, and
//! its figures are timings, so it runs only with DRVAULT_BENCH_SMOKE=1 and asserts none of them:
//! only the counts a user would check (bytes, blocks, samples) and that no figure is invented.

use std::process::Command;

fn ingest(work: &std::path::Path, kind: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_drvault"))
        .args(["bench", "ingest", "--kind", kind, "--size", "64MiB"])
        .args(["--agents", "1", "--runs", "1", "--json", "--work-dir"])
        .arg(work)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_ingest_smoke() {
    if std::env::var("DRVAULT_BENCH_SMOKE").as_deref() != Ok("1") {
        eprintln!("skipped: set DRVAULT_BENCH_SMOKE=1 to run the bench smoke test");
        return;
    }
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
