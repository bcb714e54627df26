//! Failover into Azure storage: disks written as page-blob fixed VHDs on Azurite.
//! A test and an unplanned failover write each disk as a page blob whose page ranges (Get Page
//! Ranges) are exactly the disk's non-zero 512-byte pages, joined across zero gaps of at most
//! 16 KiB inside one block, plus the footer, whose download
//! `qemu-img compare` finds identical to the point and whose footer the project's VHD reader
//! accepts; the job shows per-disk progress; cleanup of a drill leaves the container as it
//! was; and an upload cut off midway (a proxy that drops every connection once) leaves a failed
//! job with a recoverable error, no disk in the record and no blob in the container.

use crate::common;
use crate::emulators;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use drvault::failover::azure_target::AzureTarget;
use emulators::{Azurite, AZURITE_ACCOUNT, AZURITE_KEY};
use serde_json::Value;

const CONTAINER: &str = "dr-target";
/// Not a whole MiB: the page blob's virtual size rounds up to 17 MiB.
const SIZE: u64 = 16 * MIB + 1536;

fn target_options(endpoint: &str) -> Vec<(String, String)> {
    [
        ("azure_storage_account_name", AZURITE_ACCOUNT),
        ("azure_storage_account_key", AZURITE_KEY),
        ("azure_storage_endpoint", endpoint),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Server config: 256 KiB blocks, failover disks into az://dr-target/site-a at `endpoint`.
fn config(endpoint: &str) -> String {
    let mut s = format!(
        "[vault]\nblock_size = 262144\n\n[failover]\ntarget = \"az://{CONTAINER}/site-a\"\n\n[failover.target_options]\n"
    );
    for (k, v) in target_options(endpoint) {
        s.push_str(&format!("{k} = \"{v}\"\n"));
    }
    s
}

/// A VM `app` with one raw disk `d`: data at the start, across a block boundary, a block with
/// data only in its first and last page (a zero run inside a data block), two pages 3.5 KiB
/// apart (a short gap, written with them), and the short end.
fn protected(dir: &Path, endpoint: &str) -> (Server, std::path::PathBuf) {
    let server = Server::start(dir, Some(&config(endpoint)));
    let creds = server.add_host("hv", None);
    let src = dir.join("src.raw");
    raw_image(
        &src,
        SIZE,
        &[
            (0, 100_000),
            (3 * MIB - 5000, 1_500_000),
            (8 * MIB, 512),
            (8 * MIB + 256 * KIB - 512, 512),
            (9 * MIB, 512),
            (9 * MIB + 4 * KIB, 512),
            (10 * MIB, 3 * MIB as usize),
            (SIZE - 1000, 1000),
        ],
        21,
    );
    server.protect(
        &creds,
        "app",
        &format!("{}:d", src.display()),
        &["--generation", "1"],
    );
    (server, src)
}

/// The vault's block size in these tests (`config`).
const BLOCK: u64 = 256 * KIB;
/// The longest zero gap between data pages of one block that a failover writes over.
const GAP: u64 = 16 * KIB;

/// The non-zero 512-byte pages of `data` merged into ranges, joined across zero gaps of at most
/// `GAP` inside one block: the pages a failover puts.
fn data_pages(data: &[u8]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (n, page) in data.chunks(512).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let at = n as u64 * 512;
        match out.last_mut() {
            Some(r) if at - r.end <= GAP && r.start / BLOCK == at / BLOCK => r.end = at + 512,
            Some(r) if r.end == at => r.end = at + 512,
            _ => out.push(at..at + 512),
        }
    }
    out
}

fn show(server: &Server) -> Value {
    serde_json::from_str(&server.cli_ok(&["failover", "show", "--vm", "app", "--json"])).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Checks the disk blob `url` of a finished failover against the source image: page ranges
/// exactly the data plus the footer, download identical to the source for qemu-img, footer a
/// valid fixed-VHD footer for the project's reader.
fn check_disk_blob(
    rt: &tokio::runtime::Runtime,
    azurite: &Azurite,
    url: &str,
    src: &Path,
    scratch: &Path,
) {
    let target = AzureTarget::open(
        &format!("az://{CONTAINER}"),
        &target_options(&azurite.url()),
    )
    .unwrap();
    let blob = target
        .blob_of_url(url)
        .unwrap_or_else(|| panic!("{url} is not in {CONTAINER}"));
    let virt = 17 * MIB;
    let ranges = rt.block_on(target.page_ranges(blob)).unwrap();
    let mut want = data_pages(&std::fs::read(src).unwrap());
    want.push(virt..virt + 512);
    assert_eq!(
        ranges, want,
        "page ranges are not exactly the data pages (short gaps bridged) and the footer"
    );

    let bytes = rt.block_on(azurite.read(CONTAINER, blob)).unwrap();
    assert_eq!(bytes.len() as u64, virt + 512);
    let local = scratch.join("blob.vhd");
    std::fs::write(&local, &bytes).unwrap();
    assert!(
        qemu_identical(&local, "vpc", src, "raw"),
        "qemu-img compare: the blob differs from the source"
    );
    let image =
        drvault::format::image::open(&local).expect("the project's reader opens the blob as a VHD");
    assert_eq!(
        image.format(),
        drvault::format::image::ImageFormat::VhdFixed
    );
    assert_eq!(image.virtual_size(), virt);
    let footer: [u8; 512] = bytes[virt as usize..].try_into().unwrap();
    let f =
        drvault::format::vhd::Footer::parse(&footer).expect("a valid footer (checksum, cookie)");
    assert_eq!((f.current_size, f.original_size), (virt, virt));
    std::fs::remove_file(local).unwrap();
}

#[test]
fn failover_writes_page_blobs_of_only_the_data_and_drill_cleanup_leaves_the_container_as_it_was() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    let rt = runtime();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (server, src) = protected(dir, &azurite.url());
    assert!(rt.block_on(azurite.create_container(CONTAINER)));
    let before = rt.block_on(azurite.objects(CONTAINER));

    // A drill: its disk goes under site-a/drills/app/<id>/.
    server.cli_ok(&["failover", "--vm", "app", "--kind", "test"]);
    let v = show(&server);
    let rec = &v["record"];
    assert_eq!(rec["state"], "succeeded", "{rec}");
    let folder = rec["target"].as_str().unwrap();
    assert!(
        folder.starts_with(&format!("az://{CONTAINER}/site-a/drills/app/")),
        "{folder}"
    );
    let disk_url = format!("{folder}/d.vhd");
    assert!(
        rec["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == disk_url.as_str()),
        "{rec}"
    );
    check_disk_blob(&rt, &azurite, &disk_url, &src, dir);

    // The job showed the disk's progress: all its data bytes, a rate, done.
    let job: Value =
        serde_json::from_str(&server.cli_ok(&["jobs", rec["job"].as_str().unwrap(), "--json"]))
            .unwrap();
    let d = &job["disks"][0];
    assert_eq!(d["disk"], "d", "{job}");
    assert_eq!(d["done"], true, "{job}");
    assert!(d["bytes_total"].as_u64().unwrap() >= 5 * MIB, "{job}");
    assert_eq!(d["bytes_written"], d["bytes_total"], "{job}");
    assert!(d["mb_s"].as_f64().unwrap() > 0.0, "{job}");
    let text = server.cli_ok(&["jobs", rec["job"].as_str().unwrap()]);
    assert!(text.contains("disk d: ") && text.contains("MB/s"), "{text}");

    // Cleanup deletes the drill's blobs: the container is as it was.
    server.cli_ok(&["failover", "cleanup", "--vm", "app"]);
    assert_eq!(rt.block_on(azurite.objects(CONTAINER)), before);

    // An unplanned failover writes under site-a/app/<id>/, the same way.
    server.cli_ok(&["failover", "--vm", "app", "--kind", "unplanned"]);
    let v = show(&server);
    let folder = v["record"]["target"].as_str().unwrap().to_string();
    assert!(
        folder.starts_with(&format!("az://{CONTAINER}/site-a/app/")),
        "{folder}"
    );
    check_disk_blob(&rt, &azurite, &format!("{folder}/d.vhd"), &src, dir);

    // Failback reads the page blob: the VM wrote 4 KiB into a zero block of it in Azure.
    server.cli_ok(&["failover", "commit", "--vm", "app"]);
    let target = AzureTarget::open(
        &format!("az://{CONTAINER}"),
        &target_options(&azurite.url()),
    )
    .unwrap();
    let blob = format!("{}/d.vhd", target.blob_of_url(&folder).unwrap());
    rt.block_on(target.put_pages(&blob, 5 * MIB, vec![0x77u8; 4096].into()))
        .unwrap();
    let mut want = std::fs::read(&src).unwrap();
    want[5 * MIB as usize..5 * MIB as usize + 4096].fill(0x77);
    let back = dir.join("back.raw");
    let creds = server.dir.join("hv.creds.json");
    server.cli_ok(&[
        "agent",
        "failback",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "app",
        "--disk",
        "d",
        "--full",
        back.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&back).unwrap() == want,
        "the failback copy differs from the blob"
    );
}

/// A TCP proxy to `upstream` that, once `cut_after` bytes have gone upstream, drops every
/// connection open at that moment (mid-request); later connections are forwarded as usual.
struct CutProxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl CutProxy {
    fn start(upstream: u16, cut_after: u64) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let c = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                if !c.load(Ordering::Acquire) {
                    let mut o = open.lock().unwrap();
                    o.push(client.try_clone().unwrap());
                    o.push(server.try_clone().unwrap());
                }
                let (c_in, s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (sent, open, cut) = (sent.clone(), open.clone(), c.clone());
                std::thread::spawn(move || {
                    pump(c_in, s_out, |n| {
                        let total = sent.fetch_add(n, Ordering::AcqRel) + n;
                        if total > cut_after && !cut.swap(true, Ordering::AcqRel) {
                            for s in open.lock().unwrap().drain(..) {
                                let _ = s.shutdown(Shutdown::Both);
                            }
                        }
                    })
                });
                std::thread::spawn(move || pump(server, client, |_| {}));
            }
        });
        CutProxy { port, cut }
    }
}

/// Copies `from` into `to` until either side ends, telling `counted` every chunk's size.
fn pump(mut from: TcpStream, mut to: TcpStream, counted: impl Fn(u64)) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        counted(n as u64);
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[test]
fn a_storage_error_midway_fails_the_job_recoverably_and_reports_no_half_written_disk() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    let rt = runtime();
    let upstream: u16 = azurite
        .url()
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // About 6 MiB of data go up; the cut comes after 2 MiB, in the middle of the pages.
    let proxy = CutProxy::start(upstream, 2 * MIB);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let endpoint = format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", proxy.port);
    let (server, src) = protected(dir, &endpoint);

    let o = server.cli(&["failover", "--vm", "app", "--kind", "test"]);
    assert!(!o.status.success(), "the failover must fail");
    assert!(
        proxy.cut.load(Ordering::Acquire),
        "the proxy cut the upload"
    );
    let v = show(&server);
    let rec = &v["record"];
    assert_eq!(rec["state"], "failed", "{rec}");
    assert!(
        rec["files"].as_array().unwrap().is_empty(),
        "no disk is reported: {rec}"
    );
    let job: Value =
        serde_json::from_str(&server.cli_ok(&["jobs", rec["job"].as_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "target_unavailable", "{job}");
    assert_eq!(job["error"]["recoverable"], true, "{job}");
    assert!(job["disks"][0]["done"] != true, "{job}");
    // The partial blob was deleted (the storage answered again by then).
    let folder = rec["target"].as_str().unwrap();
    let prefix = folder.trim_start_matches(&format!("az://{CONTAINER}/"));
    let left: Vec<_> = rt
        .block_on(azurite.objects(CONTAINER))
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .collect();
    assert!(left.is_empty(), "partial blobs left: {left:?}");

    // Recoverable indeed: the same failover now succeeds.
    server.cli_ok(&["failover", "--vm", "app", "--kind", "test"]);
    let v = show(&server);
    assert_eq!(v["record"]["state"], "succeeded");
    let url = format!("{}/d.vhd", v["record"]["target"].as_str().unwrap());
    check_disk_blob(&rt, &azurite, &url, &src, dir);
}
