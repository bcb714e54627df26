//! Races against a real server: the same block from many connections at once, two merges of
//! one VM at once, and a merge racing a test failover. Each race is run on several fresh VMs
//! with different head starts so that different interleavings get their turn; the checks hold
//! whatever the order was. The failover race slows block reads on purpose (`DRVAULT_FAULTS`
//! latency) so that a merge usually commits while the drill is still writing its disk.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const DISK: u64 = 8 * MIB;
const CONFIG: &str = "[vault]\nblock_size = 1048576\n\n[replica]\nmerge_interval_s = 0\n";

struct World {
    _t: tempfile::TempDir,
    dir: PathBuf,
    server: Server,
    creds: PathBuf,
    /// The server's live fault rules (`DRVAULT_FAULTS=@file`), none at the start.
    faults: FaultRules,
}

fn world() -> World {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    let (server, faults) = FaultRules::start(&dir, Some(CONFIG));
    let creds = server.add_host("hv", None);
    World {
        _t: t,
        dir,
        server,
        creds,
        faults,
    }
}

impl World {
    /// Replaces the store's fault rules and waits until the server has taken them.
    fn set_faults(&mut self, rules: &str) {
        self.faults.set(&self.server, rules);
    }

    fn agent(&self, args: &[&str]) -> Output {
        let mut all = vec!["agent", args[0], "--creds", self.creds.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        self.server.cli(&all)
    }

    /// VM `vm` protected from a fresh `size`-byte image with data in `data_blocks` of its
    /// blocks and sent four cycles of logs; returns the disk's state at c0..c4.
    fn vm_with_history(&self, vm: &str, seed: u64, size: u64, data_blocks: u64) -> Vec<PathBuf> {
        let mut rng = Rng(seed);
        let s0 = self.dir.join(format!("{vm}-s0.raw"));
        let regions: Vec<(u64, usize)> = (0..data_blocks)
            .map(|i| (i * size / MIB / data_blocks * MIB + 4096, 400_000))
            .collect();
        raw_image(&s0, size, &regions, rng.next());
        let disk = format!("{}:os", s0.display());
        succeeded(
            &self.agent(&["protect", "--vm", vm, "--disk", &disk]),
            "protect",
        );
        let mut states = vec![s0];
        let mut prev = ZERO_GUID.to_string();
        for k in 1..=4usize {
            let next = self.dir.join(format!("{vm}-s{k}.raw"));
            let log = self.dir.join(format!("{vm}-c{k}.hrl"));
            prev = next_cycle(&mut rng, &states[k - 1], &next, &log, &prev, 3, MIB / 4);
            let cycle = k.to_string();
            succeeded(
                &self.agent(&[
                    "replicate",
                    "--vm",
                    vm,
                    "--disk",
                    "os",
                    "--hrl",
                    log.to_str().unwrap(),
                    "--cycle",
                    &cycle,
                ]),
                "replicate",
            );
            states.push(next);
        }
        states
    }

    fn points(&self, vm: &str) -> Vec<u64> {
        let out = succeeded(
            &self.server.cli(&["points", "--vm", vm, "--json"]),
            "points",
        );
        let ps: Value = serde_json::from_str(&out).unwrap();
        ps.as_array()
            .unwrap()
            .iter()
            .map(|p| p["cycle"].as_u64().unwrap())
            .collect()
    }

    /// Every retained point of `vm` exports as the disk was at that cycle, the journal holds
    /// one log per point after the first, and `latest` is the last state.
    fn history_is_consistent(&self, vm: &str, states: &[PathBuf]) {
        let points = self.points(vm);
        assert!(
            points.windows(2).all(|w| w[0] < w[1]),
            "{vm}: points out of order or repeated: {points:?}"
        );
        assert_eq!(
            points.last(),
            Some(&4),
            "{vm}: the latest point is gone: {points:?}"
        );
        let view: Value =
            serde_json::from_str(&succeeded(&self.server.cli(&["vms", vm, "--json"]), "vms"))
                .unwrap();
        assert_eq!(
            view["disks"][0]["journal_length"].as_u64(),
            Some(points.len() as u64 - 1),
            "{vm}: journal and points disagree: {points:?} / {}",
            view["disks"][0]
        );
        for c in points {
            self.export_equals(vm, &format!("c{c}"), &states[c as usize]);
        }
        self.export_equals(vm, "latest", &states[4]);
    }

    fn export_equals(&self, vm: &str, point: &str, expected: &Path) {
        self.server.export_os_equals(vm, point, expected, &self.dir);
    }

    /// Runs two CLI commands at once, the second `stagger_ms` after the first (so that runs
    /// meet at different stages); returns both outputs.
    fn race(&self, a: &[&str], b: &[&str], stagger_ms: u64) -> (Output, Output) {
        let run = |args: Vec<String>, delay: u64| {
            let data = self.server.data_dir.clone();
            let dir = self.dir.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(delay));
                std::process::Command::new(BIN)
                    .args(&args)
                    .env("DRVAULT_DATA_DIR", data)
                    .current_dir(dir)
                    .output()
                    .unwrap()
            })
        };
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (ta, tb) = (run(owned(a), 0), run(owned(b), stagger_ms));
        (ta.join().unwrap(), tb.join().unwrap())
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_block_from_many_connections_at_once_is_one_object() {
    let w = world();
    let token = Server::host_token(&w.creds);
    let spec = json!({"disks": [{"id": "os", "size": DISK}]});
    let _: Value = w
        .server
        .client_with(&token)
        .send_json(Method::PUT, "/v1/agent/vms/vm1", &spec)
        .await
        .unwrap();
    assert!(w.server.vault_objects("chunks").is_empty());
    let block = Bytes::from(pseudo_random(MIB as usize, 42));
    let hash = blake3::hash(&block).to_hex().to_string();
    // 24 uploads, each on its own connection, released together: 12 of block 0, and 4 each of
    // blocks 1-3 holding the same bytes.
    let go = Arc::new(tokio::sync::Barrier::new(24));
    let uploads: Vec<_> = (0..24u64)
        .map(|i| {
            let c = w.server.client_with(&token);
            let (go, block, hash) = (go.clone(), block.clone(), hash.clone());
            let index = if i < 12 { 0 } else { 1 + i % 3 };
            tokio::spawn(async move {
                go.wait().await;
                c.put_bytes::<Value>(
                    &format!("/v1/agent/vms/vm1/disks/os/blocks/{index}"),
                    &[("x-drvault-blake3", hash)],
                    block,
                )
                .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for u in uploads {
        let ack = u.await.unwrap().expect("a concurrent upload was refused");
        outcomes.push(ack["outcome"].as_str().unwrap().to_string());
    }
    assert_eq!(
        outcomes.iter().filter(|o| *o == "stored").count(),
        1,
        "more than one upload stored the block: {outcomes:?}"
    );
    assert_eq!(
        w.server.vault_objects("chunks").len(),
        1,
        "one block's bytes became several objects"
    );
    assert_eq!(
        w.server.vault_objects("stage").len(),
        4,
        "one receipt per block index"
    );
    // The agent finds all four blocks on the server and the disk reads back right.
    let img = w.dir.join("same.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(DISK).unwrap();
        for i in 0..4 {
            f.write_all_at(&block, i * MIB).unwrap();
        }
    }
    let disk = format!("{}:os", img.display());
    let sum: Value = serde_json::from_str(&succeeded(
        &w.agent(&["protect", "--vm", "vm1", "--disk", &disk, "--json"]),
        "protect",
    ))
    .unwrap();
    assert_eq!(sum["disks"][0]["uploaded_blocks"], 0, "{sum}");
    w.export_equals("vm1", "latest", &img);
}

#[test]
fn two_merges_at_once_leave_one_consistent_history() {
    let w = world();
    let races: [(&str, &str); 3] = [("c2", "all"), ("c1", "c3"), ("all", "all")];
    for (i, (a, b)) in races.iter().enumerate() {
        let vm = format!("vm{i}");
        let states = w.vm_with_history(&vm, 100 + i as u64, DISK, 4);
        let merge = |what: &str| -> Vec<String> {
            let mut v = vec!["merge".to_string(), "--vm".into(), vm.clone()];
            if what == "all" {
                v.push("--all".into());
            } else {
                v.extend(["--through".to_string(), what.to_string()]);
            }
            v
        };
        let (ma, mb) = (merge(a), merge(b));
        let (oa, ob) = w.race(
            &ma.iter().map(String::as_str).collect::<Vec<_>>(),
            &mb.iter().map(String::as_str).collect::<Vec<_>>(),
            i as u64 * 40,
        );
        eprintln!("{vm}: merge {a}: {}, merge {b}: {}", oa.status, ob.status);
        // Both may succeed (one after the other) or one may be told another merge runs; the
        // history must be whole either way.
        assert!(
            oa.status.success() || ob.status.success(),
            "neither of two merges of {vm} succeeded:\n{}\n{}",
            text(&oa),
            text(&ob)
        );
        w.history_is_consistent(&vm, &states);
        // Whatever ran, what was asked of the merge that succeeded holds.
        let points = w.points(&vm);
        for (o, what) in [(&oa, a), (&ob, b)] {
            if !o.status.success() {
                continue;
            }
            let through = match *what {
                "all" => 4,
                c => c[1..].parse::<u64>().unwrap(),
            };
            assert!(
                points[0] >= through,
                "{vm}: merge through {what} succeeded but {points:?} remain"
            );
        }
    }
}

#[test]
fn a_merge_and_a_failover_at_once_agree_on_the_disk() {
    let mut w = world();
    // Drills at an older point while every log is merged away, and at the latest point: most
    // with the failover ahead (it holds its point while the merge commits under it), the last
    // with the merge ahead (the failover may find its point gone).
    let races: [(&str, bool, u64); 4] = [
        ("c1", true, 150),
        ("c2", true, 400),
        ("latest", true, 250),
        ("c1", false, 700),
    ];
    const SIZE: u64 = 32 * MIB;
    for (i, (point, failover_first, stagger)) in races.into_iter().enumerate() {
        let vm = format!("fo{i}");
        let states = w.vm_with_history(&vm, 200 + i as u64, SIZE, SIZE / MIB);
        let merge_args = ["merge", "--vm", &vm, "--all"];
        let failover_args = ["failover", "--vm", &vm, "--kind", "test", "--point", point];
        // The drill reads every data block; the merge only those the logs touch.
        w.set_faults("op=get prefix=chunks/ kind=latency ms=60\nop=get_range prefix=chunks/ kind=latency ms=60");
        let (merge, failover) = if failover_first {
            let (f, m) = w.race(&failover_args, &merge_args, stagger);
            (m, f)
        } else {
            w.race(&merge_args, &failover_args, stagger)
        };
        w.set_faults("# none");
        assert!(merge.status.success(), "merge: {}", text(&merge));
        eprintln!(
            "{vm}: failover at {point} raced with a merge: {}",
            failover.status
        );
        // No record at all when the failover was refused before it started.
        let show: Value = serde_json::from_slice(
            &w.server
                .cli(&["failover", "show", "--vm", &vm, "--json"])
                .stdout,
        )
        .unwrap_or(Value::Null);
        if failover.status.success() {
            assert_eq!(show["record"]["state"], "succeeded", "{show}");
            let expected = match point {
                "latest" => &states[4],
                c => &states[c[1..].parse::<usize>().unwrap()],
            };
            let dir = PathBuf::from(show["record"]["output_dir"].as_str().unwrap());
            let vhd = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "vhd"))
                .expect("a drill without a VHD");
            let bytes = std::fs::read(&vhd).unwrap();
            assert!(
                bytes.len() as u64 == SIZE + 512
                    && bytes[..SIZE as usize] == std::fs::read(expected).unwrap()[..],
                "{vm}: the drill at {point} raced with a merge and holds another disk"
            );
            succeeded(
                &w.server.cli(&["failover", "cleanup", "--vm", &vm]),
                "cleanup",
            );
        } else {
            // Refused because the merge took its point first: said so, nothing left running.
            assert!(
                point != "latest" && text(&failover).contains("point_not_found"),
                "{vm}: failover at {point} failed: {}",
                text(&failover)
            );
            assert_ne!(show["record"]["state"], "running", "{show}");
        }
        w.history_is_consistent(&vm, &states);
    }
    // The logs a drill still read were deleted once it finished: none is left behind.
    eventually(
        std::time::Duration::from_secs(20),
        "merged logs deleted once the drill finished",
        || {
            let left = w.server.vault_objects("logs");
            left.is_empty()
                .then_some(())
                .ok_or_else(|| format!("{left:?}"))
        },
    );
    let deferred = w
        .server
        .log()
        .matches("deleted once the readers still using them finish")
        .count();
    eprintln!("{deferred} merges waited for a drill's readers before deleting their logs");
}
