//! The README's walk-through ("The whole flow") run as written: its ```sh blocks (those marked
//! `sh no-test` are left out: they boot a VM) are joined into one bash script and run in order
//! in an empty directory, with the built `drvault` first on PATH and the server on a port the
//! system picks (DRVAULT_LISTEN), so the README cannot drift from the code.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The fenced blocks of the README's flow section: (info string, body).
fn flow_blocks(readme: &str) -> Vec<(String, String)> {
    let start = readme
        .find("\n## The whole flow")
        .expect("the README has a section \"The whole flow\"");
    let section = &readme[start + 1..];
    let section = match section[3..].find("\n## ") {
        Some(end) => &section[..end + 3],
        None => section,
    };
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        blocks.push((info.trim().to_string(), body));
    }
    blocks
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn the_readme_walk_through_runs_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("reading README.md");
    let blocks = flow_blocks(&readme);
    let mut script = String::from(
        "set -euo pipefail\n\
         # Whatever happens, no server outlives the script.\n\
         trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n\
         set -x\n",
    );
    let mut run = 0;
    for (info, body) in &blocks {
        match info.as_str() {
            "sh" => {
                script.push_str(body);
                run += 1;
            }
            "sh no-test" => {}
            other => panic!("README flow: a ```{other} block; only sh and sh no-test are known"),
        }
    }
    assert!(run >= 3, "README flow: {run} runnable blocks");

    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_drvault"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log_path = dir.path().join("flow.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        // A port of its own, the same across the flow's restart: the hosts' credentials files
        // hold the server's URL. (Port 0 would move on the restart.)
        .env("DRVAULT_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "warn")
        .env_remove("DRVAULT_DATA_DIR")
        .env_remove("DRVAULT_SERVER")
        .env_remove("DRVAULT_TOKEN")
        .env_remove("DRVAULT_CA_CERT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        // Its own process group: on a timeout the script and its server go together.
        .process_group(0);
    let mut child = cmd.spawn().expect("starting bash");
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut out = String::new();
    std::fs::File::open(&log_path)
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status =
        status.unwrap_or_else(|| panic!("the README flow did not finish in 15 minutes:\n{out}"));
    assert!(
        status.success(),
        "the README flow failed ({status}):\n{out}"
    );

    let identical = out.matches("Images are identical.").count();
    assert_eq!(
        identical, 2,
        "both exported disks equal their source:\n{out}"
    );
    for expected in [
        "c1       ",
        "incomplete: waiting for data",
        "initial",
        "app_consistent",
        "failed over (test), not cleaned up",
        "failed over (planned), not committed",
        "drill successful: true",
    ] {
        assert!(
            out.contains(expected),
            "{expected:?} missing from the flow's output:\n{out}"
        );
    }
    // After the restart with the mapping, no VM listing warns about it any more.
    let after_restart = &out[out.find("serve --config drvault.toml").unwrap()..];
    assert!(
        !after_restart.contains("no network mapping yet"),
        "the warning outlived the mapping:\n{out}"
    );
}

#[test]
fn only_the_boot_step_is_left_out() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let skipped: Vec<String> = flow_blocks(&readme)
        .into_iter()
        .filter(|(info, _)| info != "sh")
        .map(|(_, body)| body)
        .collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    let commands: Vec<&str> = skipped[0]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert!(commands[0].contains("qemu.sh"), "{commands:?}");
}
