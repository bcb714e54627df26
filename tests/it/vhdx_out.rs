//! VHDX out: export and full failback written as dynamic VHDX, checked by qemu-img and the
//! project's own reader.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use drvault::format::vhdx::VhdxDisk;
use serde_json::Value;

const SIZE: u64 = 64 * MIB;

/// `qemu-img check` of a VHDX: its report when clean, a panic with it otherwise.
fn qemu_check_clean(path: &Path) -> String {
    let o = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx", path.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && out.contains("No errors were found"),
        "qemu-img check of {}:\n{out}{}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Opens a VHDX with the project's reader and reads the whole virtual disk.
fn read_with_own_reader(path: &Path) -> (VhdxDisk, Vec<u8>) {
    let disk = VhdxDisk::open(Arc::new(std::fs::File::open(path).unwrap()))
        .unwrap_or_else(|e| panic!("{} does not open as a VHDX: {e}", path.display()));
    let mut all = vec![0u8; disk.virtual_size() as usize];
    disk.read_at(&mut all, 0).unwrap();
    (disk, all)
}

/// A VM `app` whose one disk `d` is a 64 MiB raw image with data in three places (one of them
/// straddling two 1 MiB blocks); the rest is zeros.
fn protected(dir: &Path) -> (Server, std::path::PathBuf, std::path::PathBuf) {
    let server = Server::start(dir, Some("[vault]\nblock_size = 1048576\n"));
    let creds = server.add_host("hv", None);
    let src = dir.join("src.raw");
    raw_image(
        &src,
        SIZE,
        &[
            (0, 300_000),
            (10 * MIB + 700_000, 600_000),
            (SIZE - 4096, 4096),
        ],
        11,
    );
    server.protect(
        &creds,
        "app",
        &format!("{}:d", src.display()),
        &["--generation", "1"],
    );
    (server, creds, src)
}

#[test]
fn export_as_vhdx_allocates_only_data_blocks_and_reads_back_identical() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (server, _creds, src) = protected(dir);

    let raw = dir.join("d.raw");
    succeeded(
        &server.export("app", "d", "latest", "raw", &raw),
        "raw export",
    );
    let vhdx = dir.join("d.vhdx");
    succeeded(
        &server.export("app", "d", "latest", "vhdx", &vhdx),
        "vhdx export",
    );

    qemu_check_clean(&vhdx);
    assert!(
        qemu_identical(&vhdx, "vhdx", &raw, "raw"),
        "qemu-img compare: not identical"
    );
    assert_eq!(qemu_virtual_size(&vhdx, "vhdx"), SIZE);

    let (disk, all) = read_with_own_reader(&vhdx);
    assert!(!disk.is_fixed(), "a dynamic VHDX");
    assert!(!disk.log_replayed(), "the log is empty");
    assert!(
        all == std::fs::read(&src).unwrap(),
        "the reader's view differs from the source"
    );
    // Blocks 0, 10, 11 and 63 hold data; every other BAT entry says not present.
    assert_eq!(
        disk.allocated_ranges(),
        vec![0..MIB, 10 * MIB..12 * MIB, 63 * MIB..SIZE]
    );
    let len = std::fs::metadata(&vhdx).unwrap().len();
    assert!(
        len < 16 * MIB,
        "a 64 MiB disk with 4 MiB of allocated blocks gave a {len}-byte VHDX"
    );
}

#[test]
fn full_failback_to_a_new_vhdx_name_writes_a_dynamic_vhdx_of_the_failed_over_disk() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let (server, creds, _src) = protected(dir);
    server.cli_ok(&["failover", "--vm", "app", "--kind", "unplanned"]);
    server.cli_ok(&["failover", "commit", "--vm", "app"]);
    let v: Value =
        serde_json::from_str(&server.cli_ok(&["failover", "show", "--vm", "app", "--json"]))
            .unwrap();
    let target = Path::new(v["record"]["output_dir"].as_str().unwrap()).join("d.vhd");
    // The failed-over VM writes into a block that was all zeros.
    write_at(&target, 30 * MIB + 123, &[0x5A; 10_000]);

    let out = dir.join("back.vhdx");
    let o = server.cli(&[
        "agent",
        "failback",
        "--creds",
        creds.to_str().unwrap(),
        "--vm",
        "app",
        "--disk",
        "d",
        "--full",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["created"], true, "{s}");
    assert!(
        !dir.join("back.drvault-new").exists(),
        "the temporary file was renamed"
    );

    qemu_check_clean(&out);
    assert!(
        qemu_identical(&out, "vhdx", &target, "vpc"),
        "qemu-img compare: not identical"
    );
    let (disk, all) = read_with_own_reader(&out);
    let mut want = std::fs::read(&target).unwrap();
    want.truncate(SIZE as usize);
    assert!(
        all == want,
        "the reader's view differs from the failed-over disk"
    );
    assert_eq!(
        disk.allocated_ranges(),
        vec![
            0..MIB,
            10 * MIB..12 * MIB,
            30 * MIB..31 * MIB,
            63 * MIB..SIZE
        ]
    );
    assert!(std::fs::metadata(&out).unwrap().len() < 16 * MIB);
}
