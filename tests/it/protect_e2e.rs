//! End to end over HTTPS: protect a VM with three disks in three formats made by qemu-img, export
//! each as a fixed VHD and as raw, and let qemu-img say they are identical to the sources.

use crate::common;

use common::*;
use std::path::{Path, PathBuf};

use drvault::format::vhd::Footer;

/// An ext4 filesystem image filled with files (raw), like a real data disk.
fn ext4_image(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("ext4-src");
    std::fs::create_dir_all(src.join("docs")).unwrap();
    for i in 0..40u64 {
        let text: String = (0..2000)
            .map(|j| format!("line {j} of file {i}: the quick brown fox\n"))
            .collect();
        std::fs::write(src.join("docs").join(format!("f{i}.txt")), text).unwrap();
    }
    std::fs::write(src.join("blob.bin"), pseudo_random(3 * MIB as usize, 99)).unwrap();
    let img = dir.join("data-ext4.raw");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            src.to_str().unwrap(),
            img.to_str().unwrap(),
            "48M",
        ],
    );
    img
}

#[test]
fn protect_three_formats_and_export_identical() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some("[vault]\nblock_size = 1048576\n"));
    let creds = server.add_host("hv01", None);

    // Disk 1: ext4 raw. Disk 2: dynamic VHD from a sparse random raw. Disk 3: dynamic VHDX with
    // data written by qemu-io.
    let os = ext4_image(dir);
    let raw2 = dir.join("src2.raw");
    raw_image(
        &raw2,
        40 * MIB,
        &[
            (0, 300_000),
            (7 * MIB + 4096, 2 * MIB as usize),
            (39 * MIB, MIB as usize),
        ],
        7,
    );
    let vhd = qemu_convert(&raw2, "vpc", "subformat=dynamic", dir, "data.vhd");
    let vhdx = dir.join("logs.vhdx");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "subformat=dynamic",
            vhdx.to_str().unwrap(),
            "36M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            "write -P 0xab 1M 3M",
            "-c",
            "write -P 0x17 20M 512k",
            "-c",
            "write -P 0x01 35M 4k",
            vhdx.to_str().unwrap(),
        ],
    );

    let out = server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "web01",
        "--disk",
        &format!("{}:os", os.display()),
        "--disk",
        vhd.to_str().unwrap(),
        "--disk",
        vhdx.to_str().unwrap(),
        "--nic",
        "network=corp,mac=00:15:5d:00:00:01,ip=10.0.0.5",
        "--json",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["state"], "protected");
    let ids: Vec<&str> = summary["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["os", "data", "logs"]);
    // Zero and unallocated regions were not sent: the VHDX has 3.5 MiB + 4 KiB of data in 36 MiB.
    let logs = &summary["disks"][2];
    assert!(
        logs["uploaded_bytes"].as_u64().unwrap() <= 6 * MIB,
        "sent {logs}"
    );
    assert!(logs["zero_blocks"].as_u64().unwrap() >= 30);

    for (id, src, fmt) in [
        ("os", &os, "raw"),
        ("data", &vhd, "vpc"),
        ("logs", &vhdx, "vhdx"),
    ] {
        let out_vhd = dir.join(format!("out-{id}.vhd"));
        server.cli_ok(&[
            "export",
            "--vm",
            "web01",
            "--disk",
            id,
            "--format",
            "vhd",
            "-o",
            out_vhd.to_str().unwrap(),
        ]);
        assert!(
            qemu_identical(&out_vhd, "vpc", src, fmt),
            "exported {id} differs from its source"
        );
        let size = qemu_virtual_size(src, fmt);
        assert_eq!(
            qemu_virtual_size(&out_vhd, "vpc"),
            size,
            "qemu-img reports the exact virtual size"
        );
        assert_eq!(std::fs::metadata(&out_vhd).unwrap().len(), size + 512);
        check_footer(&out_vhd, size);
        let out_raw = dir.join(format!("out-{id}.raw"));
        server.cli_ok(&[
            "export",
            "--vm",
            "web01",
            "--disk",
            id,
            "--format",
            "raw",
            "-o",
            out_raw.to_str().unwrap(),
        ]);
        assert!(qemu_identical(&out_raw, "raw", src, fmt));
    }
    // The sparse disk's export keeps its zero blocks as holes.
    let meta = std::fs::metadata(dir.join("out-logs.vhd")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 10 * MIB,
        "zero blocks should be holes, {} bytes allocated",
        meta.blocks() * 512
    );

    // The operator sees the VM protected and both jobs succeeded.
    let vms = server.cli_ok(&["vms", "--json"]);
    let vms: serde_json::Value = serde_json::from_str(&vms).unwrap();
    assert_eq!(vms[0]["state"], "protected");
    assert_eq!(
        vms[0]["health"], "Warning",
        "NIC on an unmapped network is a warning"
    );
    let jobs: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["jobs", "--json"])).unwrap();
    let kinds: Vec<(&str, &str)> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["kind"].as_str().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert!(
        kinds.contains(&("enable_protection", "succeeded")),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("finalize_protection", "succeeded")),
        "{kinds:?}"
    );
}

/// The footer, field by field, against specs/vhd.md.
fn check_footer(path: &std::path::Path, size: u64) {
    let bytes = std::fs::read(path).unwrap();
    let f: [u8; 512] = bytes[bytes.len() - 512..].try_into().unwrap();
    assert_eq!(&f[0..8], b"conectix");
    assert_eq!(
        u32::from_be_bytes(f[8..12].try_into().unwrap()),
        2,
        "features"
    );
    assert_eq!(
        u32::from_be_bytes(f[12..16].try_into().unwrap()),
        0x0001_0000,
        "version"
    );
    assert_eq!(
        u64::from_be_bytes(f[16..24].try_into().unwrap()),
        u64::MAX,
        "data offset"
    );
    assert_eq!(&f[28..32], b"drvt", "creator application");
    assert_eq!(&f[36..40], b"Wi2k", "creator host OS");
    assert_eq!(
        u64::from_be_bytes(f[40..48].try_into().unwrap()),
        size,
        "original size"
    );
    assert_eq!(
        u64::from_be_bytes(f[48..56].try_into().unwrap()),
        size,
        "current size"
    );
    assert_eq!(
        u16::from_be_bytes(f[56..58].try_into().unwrap()),
        65535,
        "cylinders"
    );
    assert_eq!((f[58], f[59]), (16, 255), "heads, sectors per track");
    assert_eq!(
        u32::from_be_bytes(f[60..64].try_into().unwrap()),
        2,
        "disk type fixed"
    );
    let sum: u32 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, b)| *b as u32)
        .sum();
    assert_eq!(
        u32::from_be_bytes(f[64..68].try_into().unwrap()),
        !sum,
        "checksum"
    );
    assert_eq!(f[84], 0, "saved state");
    assert!(f[85..].iter().all(|b| *b == 0), "reserved");
    assert!(Footer::parse(&f).is_ok());
}

#[test]
fn interrupted_replication_resumes_sending_only_what_is_missing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some("[vault]\nblock_size = 1048576\n"));
    let creds = server.add_host("hv01", None);
    let img = dir.join("disk.raw");
    // 16 data blocks of 1 MiB, 8 zero blocks.
    raw_image(&img, 24 * MIB, &[(0, 16 * MIB as usize)], 3);

    // A first agent run that dies after 6 blocks: simulated by uploading them through the API.
    let token = Server::host_token(&creds);
    let host = server.client_with(&token);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let spec = serde_json::json!({"disks": [{"id": "disk", "size": 24 * MIB}]});
        let _: serde_json::Value = host
            .send_json(reqwest::Method::PUT, "/v1/agent/vms/app01", &spec)
            .await
            .unwrap();
        let data = std::fs::read(&img).unwrap();
        for i in 0..6usize {
            let block =
                bytes::Bytes::copy_from_slice(&data[i * MIB as usize..(i + 1) * MIB as usize]);
            let h = blake3::hash(&block).to_hex().to_string();
            let _: serde_json::Value = host
                .put_bytes(
                    &format!("/v1/agent/vms/app01/disks/disk/blocks/{i}"),
                    &[("x-drvault-blake3", h)],
                    block,
                )
                .await
                .unwrap();
        }
    });
    let vm: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["vms", "app01", "--json"])).unwrap();
    assert_eq!(vm["state"], "initial_replication");
    assert_eq!(vm["disks"][0]["blocks_received"], 6);

    let out = server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "app01",
        "--disk",
        &format!("{}:disk", img.display()),
        "--json",
    ]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = &s["disks"][0];
    assert_eq!(d["already_on_server"], 6);
    assert_eq!(d["uploaded_blocks"], 10);
    assert_eq!(d["zero_blocks"], 8);
    assert_eq!(s["state"], "protected");
    let out_raw = dir.join("out.raw");
    server.cli_ok(&[
        "export",
        "--vm",
        "app01",
        "--disk",
        "disk",
        "--format",
        "raw",
        "-o",
        out_raw.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&out_raw).unwrap(),
        std::fs::read(&img).unwrap()
    );

    // Running the agent again changes nothing and sends nothing.
    let out = server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "app01",
        "--disk",
        &format!("{}:disk", img.display()),
        "--json",
    ]);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["disks"][0]["uploaded_blocks"], 0);
}

#[test]
fn identical_disks_are_stored_once_and_server_restart_keeps_everything() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let mut server = Server::start(dir, Some("[vault]\nblock_size = 1048576\n"));
    let creds = server.add_host("hv01", None);
    let img = dir.join("golden.raw");
    raw_image(&img, 8 * MIB, &[(0, 5 * MIB as usize)], 11);
    for vm in ["clone1", "clone2"] {
        server.cli_ok(&[
            "agent",
            "protect",
            "--creds",
            creds.to_str().unwrap(),
            "--vm",
            vm,
            "--disk",
            &format!("{}:os", img.display()),
        ]);
    }
    assert_eq!(
        server.vault_objects("chunks").len(),
        5,
        "five distinct data blocks, stored once across both VMs"
    );
    assert!(server.stop().success(), "SIGTERM is a clean shutdown");
    let server = Server::start(dir, Some("[vault]\nblock_size = 1048576\n"));
    let out = dir.join("c2.raw");
    server.cli_ok(&[
        "export",
        "--vm",
        "clone2",
        "--disk",
        "os",
        "--format",
        "raw",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    let metrics = rt_get(&server, "/metrics");
    for m in [
        "drvault_http_requests_total",
        "drvault_http_request_duration_seconds",
        "drvault_jobs",
    ] {
        assert!(metrics.contains(m), "/metrics lacks {m}");
    }
}

fn rt_get(server: &Server, path: &str) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(server.ca_pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        c.get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
}

/// Copies `from` to `dir/name` with `edits` (offset, bytes) applied: a damaged container.
fn damaged_copy(from: &Path, dir: &Path, name: &str, edits: &[(u64, &[u8])]) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).unwrap();
    for &(at, bytes) in edits {
        write_at(&to, at, bytes);
    }
    to
}

/// Converts the raw image `raw` with qemu-img into `dir/name`.
fn qemu_convert(raw: &Path, format: &str, options: &str, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            format,
            "-o",
            options,
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    out
}

/// A damaged or fake VHD/VHDX is refused before anything reaches the server: the error names
/// the file and what is wrong, and the vault is unchanged (no VM, no block). `--format raw` is
/// there for whoever means it, and damage the formats tolerate still replicates exactly.
#[test]
fn damaged_or_fake_vhd_and_vhdx_are_refused_and_the_vault_is_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some("[vault]\nblock_size = 1048576\n"));
    let creds = server.add_host("hv01", None);
    let src = dir.join("src.raw");
    raw_image(&src, 8 * MIB, &[(0, 300_000), (5 * MIB, MIB as usize)], 21);
    let vhdx = qemu_convert(&src, "vhdx", "subformat=dynamic", dir, "good.vhdx");
    let vhd = qemu_convert(&src, "vpc", "subformat=dynamic", dir, "good.vhd");
    let vhd_footer = std::fs::metadata(&vhd).unwrap().len() - 512;
    let fake = dir.join("fake.VHDX");
    std::fs::write(&fake, pseudo_random(32 * MIB as usize, 22)).unwrap();
    let protect = |vm: &str, disk: &Path, extra: &[&str]| {
        let disk = format!("{}:os", disk.display());
        let mut args = vec![
            "agent",
            "protect",
            "--creds",
            creds.to_str().unwrap(),
            "--vm",
            vm,
            "--disk",
            &disk,
        ];
        args.extend_from_slice(extra);
        server.cli(&args)
    };

    let refused = [
        (
            damaged_copy(&vhdx, dir, "sig.vhdx", &[(0, b"XXXXXXXX")]),
            "not a VHDX file: signature 'vhdxfile' missing at offset 0",
        ),
        (
            damaged_copy(
                &vhd,
                dir,
                "cookies.vhd",
                &[(0, b"XXXXXXXX"), (vhd_footer, b"XXXXXXXX")],
            ),
            "not a VHD file: cookie 'conectix' missing",
        ),
        (
            fake.clone(),
            "not a VHDX file: signature 'vhdxfile' missing",
        ),
        // No container name: the intact headers behind the damaged signature give it away.
        (
            damaged_copy(&vhdx, dir, "sig-vhdx.img", &[(0, b"XXXXXXXX")]),
            "it looks like a VHDX whose signature 'vhdxfile' at offset 0 is damaged",
        ),
    ];
    let before = server.vault_objects("");
    for (path, problem) in &refused {
        let o = protect("web01", path, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{} was protected: {err}",
            path.display()
        );
        assert!(
            err.contains(&format!("{}: {problem}", path.display()))
                && err.contains("if this really is a raw disk, pass --format raw"),
            "{}: {err}",
            path.display()
        );
    }
    assert_eq!(
        server.vault_objects(""),
        before,
        "a refused disk wrote to the vault"
    );
    let vms = server.cli_ok(&["vms", "--json"]);
    assert!(!vms.contains("web01"), "web01 registered: {vms}");

    // One of the two VHDX headers damaged, a dynamic VHD's end footer damaged in place: the
    // formats tolerate both (qemu and Hyper-V read them), so the disk replicates exactly.
    for (vm, path) in [
        (
            "header1",
            damaged_copy(&vhdx, dir, "header1.vhdx", &[(64 * KIB, b"XXXX")]),
        ),
        (
            "footer",
            damaged_copy(&vhd, dir, "footer.vhd", &[(vhd_footer, b"XXXXXXXX")]),
        ),
    ] {
        succeeded(&protect(vm, &path, &[]), &format!("protect of {vm}"));
        let out = dir.join(format!("{vm}.raw"));
        succeeded(&server.export_os_raw(vm, "latest", &out), "export");
        let (good, fmt) = if vm == "footer" {
            (&vhd, "vpc")
        } else {
            (&vhdx, "vhdx")
        };
        assert!(qemu_identical(&out, "raw", good, fmt), "{vm} differs");
    }
    // Whoever really means raw says so: the file's own bytes are the disk.
    succeeded(
        &protect("rawfake", &fake, &["--format", "raw"]),
        "raw protect",
    );
    server.export_os_equals("rawfake", "latest", &fake, dir);
}
