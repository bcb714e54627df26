//! `drvault bench failover`: how fast a test failover materializes a protected disk as a fixed
//! VHD, next to `qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on` of the same
//! plaintext raw image in the same run.
//!
//! One server (spawned, or the one `--creds`/`--token` name) protects the image once as a VM
//! with one disk and no NICs; then each round runs a test failover (`POST /v1/vms/{vm}/failover
//! {"kind":"test"}`, polling its job every 5 ms until it succeeds), checks the VHD it wrote
//! against the raw image byte for byte when the output is on this machine, cleans the drill up,
//! and runs the qemu-img baseline. Figures are medians over the rounds.
//!
//! Decisions the brief left open:
//! * Our time is the whole failover job as the operator sees it (point choice, materialization,
//!   address assignment, definition files), from the request to the job's success; the disk
//!   is the job's only large work. MB/s is the disk's virtual size per second, as for qemu-img.
//! * The failover fsyncs the VHD before it succeeds; `qemu-img convert` does not flush by
//!   default (its cache mode is `unsafe` for the output), so the baseline is convert followed
//!   by `sync FILE`; convert alone is reported too.
//! * The vault and the raw image are both in the page cache (just written / read once), so the
//!   comparison is CPU and write speed, not cold reads.
//!
//! Two more figures, each on request:
//! * `--azure-endpoint URL`: the failover writes page blobs on that Blob endpoint (Azurite on
//!   loopback here) and the baseline is the Azure SDK for Python uploading a fixed VHD of the
//!   same image ([`super::page_blobs`]); the bytes each leaves written are compared too.
//! * `--boot-image IMG`: the time from a test failover's request to its guest answering ping
//!   on the drill network, against the guest's boot alone ([`super::boot`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Serialize;

use super::baselines::{self, Outcome};
use super::boot::{self, BootRun, BootSetup};
use super::images;
use super::page_blobs::{self, BlobTarget};
use super::procstat::{clock_ticks_per_second, cpu_ticks};
use super::report::{self, Figure, ImageInfo};
use super::server::{run_tag, RunClients, Target, TargetArgs};
use super::{io_err, BenchError};
use crate::format::image::ImageFormat;

#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub image: images::ImageArgs,
    /// Measured rounds (failover + cleanup + baseline); figures are medians.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Discarded rounds before the measured ones: on a virtual machine, the first failover
    /// after protection writes into memory the host has taken back, and pays for it.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Skip the baseline (qemu-img, or the Azure SDK with --azure-endpoint).
    #[arg(long)]
    pub no_baselines: bool,
    /// Fail over into page blobs on this Azure Blob endpoint instead of local files, e.g.
    /// Azurite's `http://127.0.0.1:10000/devstoreaccount1`; the baseline becomes the Azure SDK
    /// for Python (azure-storage-blob) uploading a fixed VHD of the image. A container
    /// `drvault-bench-PID` is created and left for inspection.
    #[arg(long, value_name = "URL")]
    pub azure_endpoint: Option<String>,
    /// With --azure-endpoint: the storage account.
    #[arg(long, default_value = page_blobs::EMULATOR_ACCOUNT, requires = "azure_endpoint")]
    pub azure_account: String,
    /// With --azure-endpoint: the account key (default: the emulator's public development key).
    #[arg(
        long,
        env = "DRVAULT_BENCH_AZURE_KEY",
        hide_env_values = true,
        hide_default_value = true,
        default_value = page_blobs::EMULATOR_KEY
    )]
    pub azure_key: String,
    /// Also time, per round, a test failover of this bootable raw image from the request to
    /// its guest answering ping on the drill network, against the boot alone. Needs root, ip,
    /// dnsmasq, nft and qemu-system-x86_64; fixtures/boot-disk/make-boot-disk.sh makes an image.
    #[arg(long, value_name = "IMG")]
    pub boot_image: Option<PathBuf>,
    /// With --boot-image: qemu's accelerator (auto: KVM when /dev/kvm opens, else TCG; where a
    /// KVM guest hangs in the BIOS, pass tcg).
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// Print one JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverRun {
    /// From the failover request to its job's success.
    pub failover_s: f64,
    /// Disk bytes per second.
    pub materialize_mb_s: f64,
    pub disk_bytes: u64,
    /// CPU seconds the spawned server used during the failover (None for an existing server).
    pub server_cpu_s: Option<f64>,
    /// The VHD's size (virtual size rounded up to whole MiB, plus the 512-byte footer).
    pub vhd_bytes: Option<u64>,
    /// Whether the VHD's data equals the raw image (None: the output is not on this machine).
    pub vhd_identical: Option<bool>,
    pub cleanup_s: f64,
    pub qemu_convert: Outcome,
    pub qemu_convert_sync: Outcome,
    /// With --azure-endpoint: bytes the disk's page blob holds as written (Get Page Ranges).
    pub blob_written_bytes: Option<u64>,
    /// With --azure-endpoint: the Azure SDK's upload of a fixed VHD of the image.
    pub sdk_upload: Option<Outcome>,
    pub sdk_written_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub tool: &'static str,
    pub version: &'static str,
    pub image: ImageInfo,
    pub server: String,
    pub protect_s: f64,
    pub figures: Vec<Figure>,
    pub runs: Vec<FailoverRun>,
    pub boots: Vec<BootRun>,
    pub notes: Vec<String>,
}

pub async fn run(args: FailoverArgs) -> Result<i32, BenchError> {
    if args.runs == 0 {
        return Err(BenchError::Invalid("--runs must be at least 1".into()));
    }
    let target = Target::from_args(&args.target)?;
    if args.boot_image.is_some() {
        boot::check_tools()?;
    }
    let p = images::prepare(&args.image).await?;
    let run_dir = p.work.join("runs").join("failover");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).map_err(io_err("creating", &run_dir))?;
    // qemu-img and the check read a plaintext raw file: the image itself, or a raw copy.
    let raw = if p.image.format() == ImageFormat::Raw {
        p.path.clone()
    } else {
        let out = run_dir.join("plain.raw");
        let (img, o2) = (p.image.clone(), out.clone());
        tokio::task::spawn_blocking(move || images::write_raw(img.as_ref(), &o2))
            .await
            .map_err(|e| BenchError::Invalid(format!("raw copy stopped: {e}")))??;
        out
    };
    images::warm_page_cache(&raw)?;
    let blobs = args.azure_endpoint.as_ref().map(|endpoint| BlobTarget {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        account: args.azure_account.clone(),
        key: args.azure_key.clone(),
        container: format!("drvault-bench-{}", std::process::id()),
    });
    let mut config = String::new();
    if let Some(b) = &blobs {
        config.push_str(&b.server_config());
    }
    if args.boot_image.is_some() {
        config.push_str(boot::NETWORKS);
    }
    let session = target
        .session_with(&run_dir, Some(config.as_str()).filter(|c| !c.is_empty()))
        .await?;
    let result = async {
        let (protect_s, runs) =
            measure(&session, &args, &p, &raw, &run_dir, blobs.as_ref()).await?;
        let boots = match &args.boot_image {
            Some(img) => boot_rounds(&session, &target, &args, img, &run_dir).await?,
            None => Vec::new(),
        };
        Ok::<_, BenchError>((protect_s, runs, boots))
    }
    .await;
    let stopped = session.finish().await;
    let _ = std::fs::remove_dir_all(&run_dir);
    let (protect_s, runs, boots) = result?;
    stopped?;
    let mut r = build(p.info, target.describe(), protect_s, runs, boots);
    if args.warmup > 0 {
        r.notes.push(format!(
            "{} warm-up round(s) of failover and baseline ran first and were discarded",
            args.warmup
        ));
    }
    if let Some(b) = &blobs {
        r.notes.push(format!(
            "page blobs on {} (container {}); the SDK uploads with 8 requests in flight, drvault writes 8 blocks at a time",
            b.endpoint, b.container
        ));
    }
    if args.json {
        println!("{}", report::json(&r)?);
    } else {
        print!("{}", table(&r));
    }
    Ok(0)
}

/// Protects the boot image as a generation-1 VM with one NIC on `corp` and runs the boot
/// rounds (warm-up ones discarded).
async fn boot_rounds(
    session: &RunClients,
    target: &Target,
    args: &FailoverArgs,
    img: &std::path::Path,
    run_dir: &std::path::Path,
) -> Result<Vec<BootRun>, BenchError> {
    let Target::Spawn { exe } = target else {
        return Err(BenchError::Invalid(
            "--boot-image needs a spawned server (no --creds)".into(),
        ));
    };
    let image = crate::format::image::open(img)
        .map_err(|e| BenchError::Invalid(format!("--boot-image {}: {e}", img.display())))?;
    let vm = format!("bench-boot-{}", run_tag());
    eprintln!("bench: protecting {vm} (boot image)");
    session
        .protect_vm(&vm, img, image.into(), 1, vec![boot::nic()])
        .await?;
    let setup = BootSetup {
        session,
        exe,
        data_dir: &run_dir.join("data"),
        vm: &vm,
        accel: boot::accel(&args.accel),
        run_dir,
    };
    let mut boots = Vec::new();
    for k in 0..args.warmup + args.runs {
        eprintln!(
            "bench: boot round {}/{}{}: test failover of {vm} until its guest answers ping ({})",
            k + 1,
            args.warmup + args.runs,
            if k < args.warmup {
                " (warm-up, discarded)"
            } else {
                ""
            },
            setup.accel
        );
        let r = boot::round(&setup, k).await?;
        if k >= args.warmup {
            boots.push(r);
        }
    }
    Ok(boots)
}

async fn measure(
    session: &RunClients,
    args: &FailoverArgs,
    p: &images::Prepared,
    raw: &std::path::Path,
    run_dir: &std::path::Path,
    blobs: Option<&BlobTarget>,
) -> Result<(f64, Vec<FailoverRun>), BenchError> {
    let vm = format!("bench-failover-{}", run_tag());
    eprintln!("bench: protecting {vm}");
    let t = Instant::now();
    session.protect(&vm, &p.path, p.image.clone()).await?;
    let protect_s = t.elapsed().as_secs_f64();
    let tck = clock_ticks_per_second();
    let size = p.image.virtual_size();
    let mut runs = Vec::new();
    for k in 0..args.warmup + args.runs {
        let warm = k < args.warmup;
        if warm {
            eprintln!("bench: warm-up round (discarded): test failover of {vm}");
        } else {
            eprintln!(
                "bench: round {}/{}: test failover of {vm}",
                k - args.warmup + 1,
                args.runs
            );
        }
        let pid = session.server.as_ref().map(|s| s.pid.to_string());
        let cpu0 = pid.as_deref().map(cpu_ticks).transpose()?;
        let t = Instant::now();
        let rec: serde_json::Value = session
            .operator
            .send_json(
                Method::POST,
                &format!("/v1/vms/{vm}/failover"),
                &serde_json::json!({ "kind": "test" }),
            )
            .await?;
        let job = rec["job"]
            .as_str()
            .ok_or_else(|| BenchError::Server(format!("failover answer without a job: {rec}")))?;
        session.wait_job(job, Duration::from_millis(5)).await?;
        let failover_s = t.elapsed().as_secs_f64();
        let server_cpu_s = match (pid.as_deref(), cpu0) {
            (Some(p), Some(c0)) => {
                Some(cpu_ticks(p)?.own.saturating_sub(c0.own) as f64 / tck as f64)
            }
            _ => None,
        };
        let view: serde_json::Value = session
            .operator
            .get_json(&format!("/v1/vms/{vm}/failover"))
            .await?;
        let vhd_name = view["record"]["files"].as_array().and_then(|f| {
            f.iter()
                .filter_map(|x| x.as_str())
                .find(|x| x.ends_with(".vhd"))
        });
        let blob_written_bytes = match (blobs, vhd_name) {
            (Some(b), Some(url)) => Some(b.written_bytes(url).await?),
            (Some(_), None) => {
                return Err(BenchError::Server(format!(
                    "the failover record names no .vhd blob: {view}"
                )))
            }
            (None, _) => None,
        };
        let vhd = vhd_name.filter(|_| blobs.is_none()).map(PathBuf::from);
        let (vhd_bytes, vhd_identical) = match vhd.filter(|v| v.exists()) {
            Some(v) => {
                let bytes = std::fs::metadata(&v).map_err(io_err("reading", &v))?.len();
                let r2 = raw.to_path_buf();
                let diff =
                    tokio::task::spawn_blocking(move || images::first_difference(&v, &r2, size))
                        .await
                        .map_err(|e| BenchError::Invalid(format!("comparison stopped: {e}")))??;
                if let Some(at) = diff {
                    return Err(BenchError::Invalid(format!(
                        "the materialized VHD differs from the image at byte {at}"
                    )));
                }
                (Some(bytes), Some(true))
            }
            None => (None, None),
        };
        let t = Instant::now();
        let _: serde_json::Value = session
            .operator
            .send_json(
                Method::POST,
                &format!("/v1/vms/{vm}/failover/cleanup"),
                &serde_json::json!({}),
            )
            .await?;
        let cleanup_s = t.elapsed().as_secs_f64();
        let not_run = || Outcome::Failed {
            note: "not run (--no-baselines)".into(),
        };
        let ((qemu_convert, qemu_convert_sync), (sdk_upload, sdk_written_bytes)) =
            match (args.no_baselines, blobs) {
                (true, None) => ((not_run(), not_run()), (None, None)),
                (true, Some(_)) => ((not_run(), not_run()), (Some(not_run()), None)),
                (false, None) => {
                    eprintln!("bench:   baseline: qemu-img convert -O vpc (fixed)");
                    let q = baselines::qemu_img_vpc(raw, &run_dir.join("baseline"), tck).await;
                    (q, (None, None))
                }
                (false, Some(b)) => {
                    eprintln!("bench:   baseline: azure-storage-blob upload_blob (page blob)");
                    let (o, w) =
                        page_blobs::sdk_upload(raw, &run_dir.join("baseline"), b, tck).await;
                    let skipped = || Outcome::Failed {
                        note: "not run: the baseline here is the Azure SDK".into(),
                    };
                    ((skipped(), skipped()), (Some(o), w))
                }
            };
        if warm {
            continue;
        }
        runs.push(FailoverRun {
            failover_s,
            materialize_mb_s: size as f64 / failover_s.max(1e-9) / 1e6,
            server_cpu_s,
            disk_bytes: size,
            vhd_bytes,
            vhd_identical,
            cleanup_s,
            qemu_convert,
            qemu_convert_sync,
            blob_written_bytes,
            sdk_upload,
            sdk_written_bytes,
        });
    }
    Ok((protect_s, runs))
}

pub fn build(
    image: ImageInfo,
    server: String,
    protect_s: f64,
    runs: Vec<FailoverRun>,
    boots: Vec<BootRun>,
) -> FailoverReport {
    let ours: Vec<f64> = runs.iter().map(|r| r.materialize_mb_s).collect();
    let secs: Vec<f64> = runs.iter().map(|r| r.failover_s).collect();
    let cpu_per_gb: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.server_cpu_s.map(|c| c / (r.disk_bytes as f64 / 1e9)))
        .collect();
    let blobs = runs.iter().any(|r| r.blob_written_bytes.is_some());
    let mut figures = if blobs {
        let sdk: Vec<&Outcome> = runs.iter().filter_map(|r| r.sdk_upload.as_ref()).collect();
        let mb = |v: Option<u64>| v.map(|b| b as f64 / 1e6);
        vec![
            Figure::against(
                "failover into page blobs MB/s",
                &ours,
                &sdk,
                "azure-storage-blob upload_blob of a fixed VHD",
                |m| m.mb_s,
            ),
            Figure::against(
                "failover into page blobs s (job)",
                &secs,
                &sdk,
                "azure-storage-blob upload, s",
                |m| m.seconds,
            ),
            Figure::new(
                "page blob MB written",
                &runs
                    .iter()
                    .filter_map(|r| mb(r.blob_written_bytes))
                    .collect::<Vec<_>>(),
                &runs
                    .iter()
                    .map(|r| mb(r.sdk_written_bytes))
                    .collect::<Vec<_>>(),
                "azure-storage-blob MB written",
            ),
            Figure::new(
                "server CPU s per GB",
                &cpu_per_gb,
                &sdk.iter()
                    .map(|o| o.measured().and_then(|m| m.cpu_s_per_gb))
                    .collect::<Vec<_>>(),
                "azure-storage-blob CPU s per GB",
            ),
        ]
    } else {
        let synced: Vec<&Outcome> = runs.iter().map(|r| &r.qemu_convert_sync).collect();
        let plain: Vec<&Outcome> = runs.iter().map(|r| &r.qemu_convert).collect();
        vec![
            Figure::against(
                "test failover MB/s (materialize)",
                &ours,
                &synced,
                "qemu-img convert -O vpc fixed + sync",
                |m| m.mb_s,
            ),
            Figure::against(
                "test failover MB/s (materialize)",
                &ours,
                &plain,
                "qemu-img convert alone, not flushed",
                |m| m.mb_s,
            ),
            Figure::against(
                "test failover s (job)",
                &secs,
                &synced,
                "qemu-img convert + sync, s",
                |m| m.seconds,
            ),
            Figure::new(
                "server CPU s per GB",
                &cpu_per_gb,
                &synced
                    .iter()
                    .map(|o| o.measured().and_then(|m| m.cpu_s_per_gb))
                    .collect::<Vec<_>>(),
                "qemu-img convert + sync CPU s per GB",
            ),
        ]
    };
    figures.push(Figure::alone(
        "cleanup s",
        &runs.iter().map(|r| r.cleanup_s).collect::<Vec<_>>(),
    ));
    if !boots.is_empty() {
        figures.push(Figure::new(
            "failover request to guest answering ping, s",
            &boots.iter().map(|b| b.total_s).collect::<Vec<_>>(),
            &boots.iter().map(|b| Some(b.boot_s)).collect::<Vec<_>>(),
            "the guest's boot alone (qemu.sh start to ping), s",
        ));
        figures.push(Figure::alone(
            "  of which failover job s",
            &boots.iter().map(|b| b.job_s).collect::<Vec<_>>(),
        ));
        figures.push(Figure::alone(
            "  of which network up s",
            &boots.iter().map(|b| b.network_up_s).collect::<Vec<_>>(),
        ));
    }
    let mut notes = vec![
        "MB = 10^6 bytes of virtual disk; ratios are ours/baseline: above 1 is better for MB/s, below 1 for s".to_string(),
    ];
    if blobs {
        notes.push("ours reads every block from the vault (decrypt, decompress, verify) and puts its data pages; the SDK reads a fixed VHD from the page cache and puts every 4 MiB chunk holding any data, whole".into());
    } else {
        notes.push("ours reads every block from the vault (decrypt, decompress, verify), writes a fixed VHD with zero blocks as holes and fsyncs it; qemu-img reads the plaintext raw image from the page cache".into());
        if runs.iter().any(|r| r.vhd_identical == Some(true)) {
            notes.push("every materialized VHD was checked byte for byte against the image".into());
        } else {
            notes.push("the failover output is not on this machine: VHDs were not checked".into());
        }
    }
    notes.push("server and baseline share this machine; the vault's chunks and the raw image are in the page cache".to_string());
    if let Some(b) = boots.first() {
        notes.push(format!(
            "boot rounds: a test failover of the boot image, `drvault network up` of its drill network in a namespace of the bench, the failover's own qemu.sh ({}), ping from the gateway every ~0.1 s (1 s timeout) until {} answers",
            b.accel, b.address
        ));
    }
    FailoverReport {
        tool: "drvault bench failover",
        version: env!("CARGO_PKG_VERSION"),
        image,
        server,
        protect_s,
        figures,
        runs,
        boots,
        notes,
    }
}

pub fn table(r: &FailoverReport) -> String {
    let heading = vec![
        format!(
            "drvault bench failover: {} image {} ({}, {}), {} round(s)",
            r.image.kind.map(|k| k.as_str()).unwrap_or("given"),
            r.image.path,
            crate::util::human_bytes(r.image.virtual_size),
            r.image.source,
            r.runs.len()
        ),
        format!("  protect (setup): {:.1} s", r.protect_s),
        format!("  server: {}", r.server),
    ];
    report::figures_table(&heading, &r.figures, &r.notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mb_s: f64, q: Outcome) -> FailoverRun {
        FailoverRun {
            failover_s: 2000.0 / mb_s,
            materialize_mb_s: mb_s,
            server_cpu_s: Some(1.0),
            disk_bytes: 2_000_000_000,
            vhd_bytes: Some(1),
            vhd_identical: Some(true),
            cleanup_s: 0.1,
            qemu_convert: q.clone(),
            qemu_convert_sync: q,
            blob_written_bytes: None,
            sdk_upload: None,
            sdk_written_bytes: None,
        }
    }

    #[test]
    fn ratios_against_qemu_and_missing_peers() {
        let q = |mb_s| {
            Outcome::Ok(baselines::Measured {
                seconds: 2000.0 / mb_s,
                mb_s,
                cpu_s_per_gb: None,
                written_bytes: None,
            })
        };
        let r = build(
            ImageInfo::default(),
            "s".into(),
            1.0,
            vec![
                run(500.0, q(1000.0)),
                run(400.0, q(800.0)),
                run(600.0, q(900.0)),
            ],
            Vec::new(),
        );
        assert_eq!(r.figures[0].ours, Some(500.0));
        assert_eq!(r.figures[0].baseline, Some(900.0));
        assert_eq!(r.figures[0].ratio, Some(500.0 / 900.0));
        assert_eq!(r.figures[2].ours, Some(4.0));
        assert_eq!(r.figures[3].figure, "server CPU s per GB");
        assert_eq!(r.figures[3].ours, Some(0.5));
        assert_eq!(r.figures[3].ratio, None, "no CPU figure for qemu-img here");
        assert!(table(&r).contains("qemu-img convert -O vpc fixed + sync"));

        let missing = Outcome::Missing {
            note: "qemu-img is not installed".into(),
        };
        let r = build(
            ImageInfo::default(),
            "s".into(),
            1.0,
            vec![run(500.0, missing)],
            Vec::new(),
        );
        assert_eq!(r.figures[0].ratio, None);
        assert!(r.figures[0].baseline_what.starts_with("missing"));
        let j: serde_json::Value = serde_json::from_str(&report::json(&r).unwrap()).unwrap();
        assert_eq!(j["runs"][0]["qemu_convert"]["status"], "missing");
    }

    #[test]
    fn page_blob_and_boot_figures_compare_with_the_sdk_and_the_boot_alone() {
        let sdk = |mb_s: f64| {
            Outcome::Ok(baselines::Measured {
                seconds: 2000.0 / mb_s,
                mb_s,
                cpu_s_per_gb: Some(2.0),
                written_bytes: Some(800_000_000),
            })
        };
        let blob_run = |mb_s: f64| FailoverRun {
            blob_written_bytes: Some(700_000_000),
            sdk_upload: Some(sdk(mb_s * 2.0)),
            sdk_written_bytes: Some(800_000_000),
            vhd_bytes: None,
            vhd_identical: None,
            ..run(
                mb_s,
                Outcome::Failed {
                    note: "not run".into(),
                },
            )
        };
        let boot = |total_s: f64, boot_s: f64| BootRun {
            total_s,
            job_s: 1.0,
            network_up_s: 0.5,
            boot_s,
            address: "10.99.1.4".into(),
            accel: "tcg".into(),
        };
        let r = build(
            ImageInfo::default(),
            "s".into(),
            1.0,
            vec![blob_run(100.0), blob_run(200.0), blob_run(150.0)],
            vec![boot(30.0, 20.0), boot(24.0, 20.0), boot(27.0, 18.0)],
        );
        assert_eq!(r.figures[0].figure, "failover into page blobs MB/s");
        assert_eq!(r.figures[0].ours, Some(150.0));
        assert_eq!(
            r.figures[0].ratio,
            Some(0.5),
            "against the SDK at twice the speed"
        );
        let written = &r.figures[2];
        assert_eq!(written.figure, "page blob MB written");
        assert_eq!((written.ours, written.baseline), (Some(700.0), Some(800.0)));
        let ping = r
            .figures
            .iter()
            .find(|f| f.figure.starts_with("failover request to guest"))
            .unwrap();
        assert_eq!((ping.ours, ping.baseline), (Some(27.0), Some(20.0)));
        let t = table(&r);
        assert!(t.contains("azure-storage-blob upload_blob"), "{t}");
        assert!(t.contains("10.99.1.4"), "{t}");
        assert!(!t.contains("qemu-img convert -O vpc"), "{t}");
    }
}
