//! Sub-block replica layers: merge and resync store only the changed pieces of a block, and
//! every reader sees one content.

use crate::common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exports disk "os" of `vm` at `point` as raw and returns the SHA-256 of the image (hex).
fn export_sha256(server: &Server, vm: &str, point: &str) -> String {
    let out = server.dir.join(format!("export-{vm}-{point}.raw"));
    let _ = std::fs::remove_file(&out);
    succeeded(
        &server.export_os_raw(vm, point, &out),
        &format!("export of {vm} at {point}"),
    );
    let hex: String = Sha256::digest(std::fs::read(&out).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::remove_file(out).unwrap();
    hex
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

const NO_BACKGROUND_MERGE: &str = "[replica]\nmerge_interval_s = 0\n";

/// A vault written by drvault before pieces existed (`fixtures/old-vault-v1`, made by its
/// `make.sh` with that release: version-1 maps, a merged base at c1 and two unmerged logs)
/// opens, exports every point as the script recorded, merges into a map with pieces, and still
/// exports the same, through garbage collection and verify.
#[test]
fn a_vault_from_before_pieces_opens_exports_and_merges() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/old-vault-v1");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    copy_tree(&fixture.join("vault"), &data.join("vault"));
    let key = data.join("master.key");
    std::fs::copy(fixture.join("master.key"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let expected: Vec<(String, String)> = std::fs::read_to_string(fixture.join("expected.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (p, h) = l.split_once(' ').unwrap();
            (p.to_string(), h.to_string())
        })
        .collect();
    let want = |p: &str| expected.iter().find(|e| e.0 == p).unwrap().1.clone();
    let server = Server::start(tmp.path(), Some(NO_BACKGROUND_MERGE));
    for p in ["c1", "c2", "c3"] {
        assert_eq!(
            export_sha256(&server, "old", p),
            want(p),
            "old vault at {p}"
        );
    }
    // Merging c2 stores its changes as pieces over the old base (a sector write widened with
    // base bytes, a page of zeros), in a version-2 map.
    server.cli_ok(&["merge", "--vm", "old", "--through", "c2"]);
    assert!(
        !server.vault_objects("packs").is_empty(),
        "the merge stored pieces in a pack"
    );
    for p in ["c2", "c3"] {
        assert_eq!(
            export_sha256(&server, "old", p),
            want(p),
            "after merging c2, {p}"
        );
    }
    server.cli_ok(&["gc", "--grace", "0"]);
    assert_eq!(export_sha256(&server, "old", "c2"), want("c2"), "after gc");
    server.cli_ok(&["merge", "--vm", "old", "--all"]);
    assert_eq!(
        export_sha256(&server, "old", "c3"),
        want("c3"),
        "after merging all"
    );
    let v = server.cli(&["verify"]);
    assert!(
        v.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&v.stdout)
    );
}

/// Writes `writes` into a copy of `from` named `to`.
fn changed(from: &Path, to: &Path, writes: &[(u64, Vec<u8>)]) {
    std::fs::copy(from, to).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(to).unwrap();
    for (at, data) in writes {
        f.write_all_at(data, *at).unwrap();
    }
}

/// A merge cut off after it stored its packs and before the disk record named the new map
/// (the record write fails, then the server is killed) leaves every point reading as before;
/// the packs nothing references are garbage, which collection removes; the merge then runs.
#[test]
fn a_merge_cut_off_after_its_packs_leaves_the_old_content_and_only_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[vault]\nblock_size = 65536\n\n[replica]\nmerge_interval_s = 0\n";
    let (mut server, mut faults) = FaultRules::start(tmp.path(), Some(config));
    let creds = server.add_host("hv01", None);
    let dir = tmp.path();
    let img: PathBuf = dir.join("os.raw");
    std::fs::write(&img, pseudo_random(1 << 20, 3)).unwrap();
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        s(&creds),
        "--vm",
        "vm",
        "--disk",
        &format!("{}:os", img.display()),
        "--format",
        "raw",
    ]);
    // Two logs of scattered 4 KiB writes and one sector write.
    let mut prev = img.clone();
    let mut images = Vec::new();
    for c in 1..=2u64 {
        let next = dir.join(format!("c{c}.raw"));
        let writes: Vec<(u64, Vec<u8>)> = (0..6u64)
            .map(|k| ((k * 3 + c) * 40960, pseudo_random(4096, 10 + k + c * 7)))
            .chain([(c * 65536 + 512, vec![c as u8; 512])])
            .collect();
        changed(&prev, &next, &writes);
        let log = dir.join(format!("c{c}.hrl"));
        let mut diff = vec![
            "hrl".to_string(),
            "diff".into(),
            s(&prev).into(),
            s(&next).into(),
        ];
        diff.extend(["-o".into(), s(&log).into()]);
        if c > 1 {
            diff.extend([
                "--after".into(),
                s(&dir.join(format!("c{}.hrl", c - 1))).into(),
            ]);
        }
        server.cli_ok(&diff.iter().map(String::as_str).collect::<Vec<_>>());
        server.cli_ok(&[
            "agent",
            "replicate",
            "--creds",
            s(&creds),
            "--vm",
            "vm",
            "--disk",
            "os",
            "--hrl",
            s(&log),
        ]);
        images.push(next.clone());
        prev = next;
    }
    // Disk record writes fail: the merge stores its packs and map, then cannot commit.
    faults.set(
        &server,
        "op=put prefix=records/disk kind=error\nop=put_if_absent prefix=records/disk kind=error",
    );
    let o = server.cli(&["merge", "--vm", "vm", "--all"]);
    assert!(!o.status.success(), "the merge could not commit");
    let packs = server.vault_objects("packs");
    assert!(!packs.is_empty(), "the merge had stored its packs");
    faults.set(&server, "# none");
    server.kill9();
    server.restart();
    for (c, image) in images.iter().enumerate() {
        server.export_os_equals("vm", &format!("c{}", c + 1), image, dir);
    }
    server.cli_ok(&["gc", "--grace", "0"]);
    let left: Vec<String> = server
        .vault_objects("packs")
        .into_iter()
        .filter(|p| packs.contains(p))
        .collect();
    assert!(
        left.is_empty(),
        "unreferenced packs not collected: {left:?}"
    );
    server.cli_ok(&["merge", "--vm", "vm", "--all"]);
    assert!(
        !server.vault_objects("packs").is_empty(),
        "the merge stored pieces"
    );
    server.export_os_equals("vm", "c2", &images[1], dir);
    server.cli_ok(&["gc", "--grace", "0"]);
    server.export_os_equals("vm", "c2", &images[1], dir);
}
