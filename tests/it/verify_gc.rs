//! Verify and garbage collection end to end against a real server.
//!
//! * Corruption: for each kind of damage (flip a byte, truncate, delete, swap two objects) applied
//!   to a stored object of each family (chunk, map, log frame, record), `drvault verify` reports
//!   exactly the damaged set, quarantines it, marks the points that need it; those points refuse
//!   export and failover, every other point exports byte-exact; restoring or re-uploading the
//!   source heals, and the next verify is clean. Damage verify has not seen yet fails a failover
//!   cleanly, leaving no output.
//! * Collection: after merge and resync supersede chunks, `gc --grace 0` removes exactly them
//!   (every retained point still exports byte-exact); the default grace frees nothing young; a
//!   collection looping during an initial replication loses nothing.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const CONFIG: &str = "[vault]\nblock_size = 1048576\n\n[resync]\nwindow = \"\"\n";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn guid(n: u64) -> String {
    format!("5c0b0000-0000-0000-0000-{n:012}")
}

/// Protects `vm` with one disk "d" from `img`.
fn protect(server: &Server, creds: &Path, vm: &str, img: &Path) {
    server.cli_ok(&[
        "agent",
        "protect",
        "--creds",
        s(creds),
        "--vm",
        vm,
        "--disk",
        &format!("{}:d", img.display()),
    ]);
}

/// Sends the log of `old` → `new` as log number `n` of the disk's chain.
fn replicate(server: &Server, creds: &Path, vm: &str, old: &Path, new: &Path, n: u64) {
    let log = server.dir.join(format!("{vm}-{n}.hrl"));
    let prev = if n == 1 {
        "00000000-0000-0000-0000-000000000000".to_string()
    } else {
        guid(n - 1 + vm.len() as u64 * 100)
    };
    server.cli_ok(&[
        "hrl",
        "diff",
        s(old),
        s(new),
        "-o",
        s(&log),
        "--unique-id",
        &guid(n + vm.len() as u64 * 100),
        "--previous-id",
        &prev,
    ]);
    server.cli_ok(&[
        "agent",
        "replicate",
        "--creds",
        s(creds),
        "--vm",
        vm,
        "--disk",
        "d",
        "--hrl",
        s(&log),
    ]);
}

/// Writes `data` at `at` of a copy of `from`, as `to`.
fn changed(from: &Path, to: &Path, writes: &[(u64, Vec<u8>)]) {
    std::fs::copy(from, to).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(to).unwrap();
    for (at, data) in writes {
        f.write_all_at(data, *at).unwrap();
    }
}

/// Exports a point as raw: the bytes, or the CLI's error text.
fn export(server: &Server, vm: &str, point: &str) -> Result<Vec<u8>, String> {
    let out = server.dir.join(format!("export-{vm}-{point}.raw"));
    let _ = std::fs::remove_file(&out);
    let o = server.export(vm, "d", point, "raw", &out);
    if o.status.success() {
        Ok(std::fs::read(&out).unwrap())
    } else {
        assert!(!out.exists(), "a failed export left {}", out.display());
        assert!(
            !out.with_extension("partial").exists(),
            "a failed export left its partial file"
        );
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

fn points(server: &Server, vm: &str) -> Vec<Value> {
    serde_json::from_str(&server.cli_ok(&["points", "--vm", vm, "--json"])).unwrap()
}

/// `drvault verify --json`: the report and whether the exit status said "clean".
fn verify(server: &Server) -> (Value, bool) {
    let o = server.cli(&["verify", "--json"]);
    let code = o.status.code();
    assert!(
        code == Some(0) || code == Some(7),
        "verify failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["clean"].as_bool(), Some(code == Some(0)));
    (r, code == Some(0))
}

fn gc(server: &Server, args: &[&str]) -> Value {
    let mut a = vec!["gc", "--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&server.cli_ok(&a)).unwrap()
}

fn freed(r: &Value) -> u64 {
    r["freed_total"]["objects"].as_u64().unwrap()
}

fn vault_path(server: &Server, key: &str) -> PathBuf {
    server.data_dir.join("vault").join(key)
}

fn set(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

/// Objects that appeared under `prefix` while `f` ran.
fn new_objects(server: &Server, prefix: &str, f: impl FnOnce()) -> Vec<String> {
    let before = set(&server.vault_objects(prefix));
    f();
    server
        .vault_objects(prefix)
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect()
}

/// The latest version of every VM and disk record.
fn latest_records(server: &Server) -> Vec<String> {
    let mut latest: BTreeMap<String, String> = BTreeMap::new();
    for fam in ["records/vm", "records/disk"] {
        for k in server.vault_objects(fam) {
            let (dir, _) = k.rsplit_once('/').unwrap();
            let e = latest.entry(dir.to_string()).or_default();
            if k > *e {
                *e = k;
            }
        }
    }
    latest.into_values().collect()
}

/// A small deterministic chooser.
struct Pick(u64);

impl Pick {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize % n
    }

    fn one<'a>(&mut self, v: &'a [String]) -> &'a String {
        &v[self.next(v.len())]
    }

    /// Two different elements.
    fn two(&mut self, v: &[String]) -> (String, String) {
        let i = self.next(v.len());
        let j = (i + 1 + self.next(v.len() - 1)) % v.len();
        (v[i].clone(), v[j].clone())
    }
}

#[derive(Clone, Copy, Debug)]
enum Harm {
    Flip,
    Truncate,
    Delete,
    Swap,
}

/// Applies `harm` to `a` (and `b` for a swap); returns the keys that are now damaged.
fn harm(server: &Server, h: Harm, a: &str, b: &str) -> Vec<String> {
    let pa = vault_path(server, a);
    let raw = std::fs::read(&pa).unwrap();
    match h {
        Harm::Flip => {
            let mut r = raw;
            let at = r.len() / 2;
            r[at] ^= 0x01;
            std::fs::write(&pa, r).unwrap();
        }
        Harm::Truncate => std::fs::write(&pa, &raw[..raw.len() / 2]).unwrap(),
        Harm::Delete => std::fs::remove_file(&pa).unwrap(),
        Harm::Swap => {
            let pb = vault_path(server, b);
            let rb = std::fs::read(&pb).unwrap();
            std::fs::write(&pa, rb).unwrap();
            std::fs::write(&pb, raw).unwrap();
            return vec![a.to_string(), b.to_string()];
        }
    }
    vec![a.to_string()]
}

struct Vm {
    name: &'static str,
    /// The disk at each point, by point id.
    model: BTreeMap<String, Vec<u8>>,
    base_image: PathBuf,
    /// The objects of each stored log (frames, extent list), in log order.
    log_objects: Vec<Vec<String>>,
}

/// Protects a 4 MiB VM and sends `logs` logs of a few scattered writes each.
fn make_vm(server: &Server, creds: &Path, name: &'static str, seed: u64, logs: u64) -> Vm {
    let img = server.dir.join(format!("{name}-0.raw"));
    raw_image(&img, 4 * MIB, &[(0, 3 * MIB as usize + 4096)], seed);
    protect(server, creds, name, &img);
    let mut model = BTreeMap::from([("c0".to_string(), std::fs::read(&img).unwrap())]);
    let mut prev = img.clone();
    let mut log_objects = Vec::new();
    for n in 1..=logs {
        let next = server.dir.join(format!("{name}-{n}.raw"));
        changed(
            &prev,
            &next,
            &[
                (n * 8192, pseudo_random(4096, seed * 10 + n)),
                (MIB + n * 65536, pseudo_random(10_000, seed * 20 + n)),
            ],
        );
        log_objects.push(new_objects(server, "logs", || {
            replicate(server, creds, name, &prev, &next, n)
        }));
        model.insert(format!("c{n}"), std::fs::read(&next).unwrap());
        prev = next;
    }
    Vm {
        name,
        model,
        base_image: img,
        log_objects,
    }
}

/// Every point of every VM: a damaged one refuses export (`point_damaged`), any other exports
/// exactly its model. Returns the ids of damaged points per VM.
fn check_points(server: &Server, vms: &[Vm]) -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut damaged = BTreeMap::new();
    for vm in vms {
        let mut bad = BTreeSet::new();
        for p in points(server, vm.name) {
            let id = p["id"].as_str().unwrap().to_string();
            match (
                p["damaged"].as_bool().unwrap(),
                export(server, vm.name, &id),
            ) {
                (true, Err(e)) => {
                    assert!(e.contains("point_damaged"), "{}/{id}: {e}", vm.name);
                    bad.insert(id);
                }
                (false, Ok(bytes)) => {
                    assert!(
                        bytes == vm.model[&id],
                        "{}/{id} exported wrong data",
                        vm.name
                    )
                }
                (d, r) => panic!(
                    "{}/{id}: damaged {d} but export {:?}",
                    vm.name,
                    r.map(|b| b.len())
                ),
            }
        }
        damaged.insert(vm.name, bad);
    }
    damaged
}

#[test]
fn verify_finds_every_damage_marks_points_and_heals() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let creds = server.add_host("hv", None);
    // a: chunk victims; b and c: map victims (a damaged map hides its chunks, so they never
    // share a VM); d: log victims (its earlier points stay sound); records from any VM.
    let mut chunks_a = Vec::new();
    let mut vms = Vec::new();
    let a = new_objects(&server, "chunks", || {
        vms.push(make_vm(&server, &creds, "a", 1, 1));
    });
    chunks_a.extend(a);
    let mut maps_bc = Vec::new();
    for (name, seed) in [("b", 2), ("c", 3)] {
        let m = new_objects(&server, "maps", || {
            vms.push(make_vm(&server, &creds, name, seed, 0));
        });
        maps_bc.push(m);
    }
    vms.push(make_vm(&server, &creds, "d", 4, 3));
    // Objects of d's second and third logs: its c0 and c1 never need them.
    let logs_d: Vec<String> = vms[3].log_objects[1..].concat();
    assert!(!chunks_a.is_empty() && logs_d.len() >= 4);
    let (r, clean) = verify(&server);
    assert!(clean, "{r}");

    let mut pick = Pick(7);
    for (round, h) in [Harm::Flip, Harm::Truncate, Harm::Delete, Harm::Swap]
        .into_iter()
        .enumerate()
    {
        let records = latest_records(&server);
        let (m_b, m_c) = (&maps_bc[0], &maps_bc[1]);
        let victims: Vec<(String, String)> = vec![
            pick.two(&chunks_a),
            (pick.one(m_b).clone(), pick.one(m_c).clone()),
            pick.two(&logs_d),
            pick.two(&records),
        ];
        let mut originals = BTreeMap::new();
        let mut expected = BTreeSet::new();
        for (x, y) in &victims {
            for k in [x, y] {
                originals.insert(k.clone(), std::fs::read(vault_path(&server, k)).unwrap());
            }
            expected.extend(harm(&server, h, x, y));
        }
        let (r, clean) = verify(&server);
        assert!(!clean);
        let found: BTreeSet<String> = r["damaged"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["key"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            found, expected,
            "round {round} ({h:?}): reported vs damaged"
        );
        for o in r["damaged"].as_array().unwrap() {
            let key = o["key"].as_str().unwrap();
            let action = o["action"].as_str().unwrap();
            let is_record = key.starts_with("records/");
            match (is_record, o["problem"].as_str().unwrap()) {
                (true, _) => assert_eq!(action, "repaired", "{o}"),
                (false, "missing") => assert_eq!(action, "registered", "{o}"),
                (false, _) => {
                    assert_eq!(action, "quarantined", "{o}");
                    let q = o["quarantined"].as_str().unwrap();
                    assert!(q.starts_with(&format!("quarantine/{key}/")));
                    assert_eq!(
                        std::fs::read(vault_path(&server, q)).unwrap(),
                        damaged_bytes(key, &originals, h, &victims),
                        "quarantine holds the damaged bytes"
                    );
                    assert!(!vault_path(&server, key).exists(), "{key} left in place");
                }
            }
        }
        let damaged = check_points(&server, &vms);
        // What the report says a damaged object needs is marked; d's first points are sound.
        for o in r["damaged"].as_array().unwrap() {
            for af in o["affects"].as_array().unwrap() {
                let vm = af["vm"].as_str().unwrap();
                for p in af["points"].as_array().unwrap() {
                    assert!(
                        damaged[vm].contains(p.as_str().unwrap()),
                        "{vm} {p} not marked"
                    );
                }
            }
        }
        // c's map is harmed only by a swap (with b's); otherwise c is an untouched VM.
        let c_hit = usize::from(matches!(h, Harm::Swap));
        assert!(
            !damaged["a"].is_empty() && damaged["b"].len() == 1 && damaged["c"].len() == c_hit,
            "round {round}: {damaged:?} {r}"
        );
        assert!(!damaged["d"].contains("c0") && !damaged["d"].contains("c1"));
        assert!(damaged["d"].contains("c3"), "{damaged:?}");
        if round == 0 {
            // Failover refuses a damaged point before writing anything.
            let o = server.cli(&["failover", "--vm", "d", "--kind", "test", "--point", "c3"]);
            assert!(!o.status.success());
            assert!(String::from_utf8_lossy(&o.stderr).contains("point_damaged"));
            assert!(!server
                .data_dir
                .join("failover")
                .join("drills")
                .join("d")
                .exists());
        }

        // Heal: the first round re-uploads a's source (another VM's initial replication stores
        // the quarantined chunk again), the others put the original bytes back.
        for (k, bytes) in &originals {
            if round == 0 && k.starts_with("chunks/") {
                continue;
            }
            if !k.starts_with("records/") {
                std::fs::create_dir_all(vault_path(&server, k).parent().unwrap()).unwrap();
                std::fs::write(vault_path(&server, k), bytes).unwrap();
            }
        }
        if round == 0 {
            let img = vms[0].base_image.clone();
            protect(&server, &creds, "a-again", &img);
            // It shares a's chunks: from now on it is checked like the others.
            vms.push(Vm {
                name: "a-again",
                model: BTreeMap::from([("c0".to_string(), std::fs::read(&img).unwrap())]),
                base_image: img,
                log_objects: Vec::new(),
            });
        }
        let (r, clean) = verify(&server);
        assert!(clean, "round {round}: {r}");
        let healed: BTreeSet<String> = r["healed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        let registered: BTreeSet<String> = expected
            .into_iter()
            .filter(|k| !k.starts_with("records/"))
            .collect();
        assert_eq!(healed, registered, "round {round}");
        let damaged = check_points(&server, &vms);
        assert!(damaged.values().all(|v| v.is_empty()), "{damaged:?}");
    }

    // Damage verify has not seen: the failover fails part-way, cleanly, and writes nothing.
    let victim = pick.one(&chunks_a).clone();
    harm(&server, Harm::Flip, &victim, "");
    let o = server.cli(&["failover", "--vm", "a", "--kind", "test", "--point", "c1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("corrupt_object"), "{err}");
    let drills = server.data_dir.join("failover").join("drills").join("a");
    let left: Vec<_> = std::fs::read_dir(&drills)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a failed failover left {left:?}");
    assert!(export(&server, "a", "c1").is_err());
    // Once verify has seen it, the refusal comes first, with the objects named.
    let (r, _) = verify(&server);
    assert_eq!(r["damaged"][0]["key"], victim.as_str());
    let o = server.cli(&["failover", "--vm", "a", "--kind", "test", "--point", "c1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("point_damaged") && err.contains(&victim),
        "{err}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (m, _) = rt
        .block_on(server.operator().get_bytes("/metrics"))
        .unwrap();
    let m = String::from_utf8_lossy(&m);
    for name in [
        "drvault_verify_objects_total",
        "drvault_verify_damaged_total",
        "drvault_quarantined_objects_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
}

/// The bytes a damaged object held when verify found it.
fn damaged_bytes(
    key: &str,
    originals: &BTreeMap<String, Vec<u8>>,
    h: Harm,
    victims: &[(String, String)],
) -> Vec<u8> {
    let raw = &originals[key];
    match h {
        Harm::Flip => {
            let mut r = raw.clone();
            let at = r.len() / 2;
            r[at] ^= 0x01;
            r
        }
        Harm::Truncate => raw[..raw.len() / 2].to_vec(),
        Harm::Delete => Vec::new(),
        Harm::Swap => {
            let other = victims
                .iter()
                .find_map(|(x, y)| (x == key).then_some(y).or((y == key).then_some(x)))
                .unwrap();
            originals[other].clone()
        }
    }
}

/// Distinct non-zero 1 MiB blocks of an image: the chunks one point of it needs.
fn distinct_blocks(img: &[u8]) -> usize {
    img.chunks(MIB as usize)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| *blake3::hash(b).as_bytes())
        .collect::<BTreeSet<_>>()
        .len()
}

#[test]
fn gc_frees_what_merge_and_resync_superseded_and_nothing_young() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let creds = server.add_host("hv", None);
    let src = server.dir.join("src.raw");
    raw_image(&src, 6 * MIB, &[(0, 5 * MIB as usize)], 11);
    protect(&server, &creds, "m", &src);
    let v1 = server.dir.join("v1.raw");
    changed(&src, &v1, &[(4096, pseudo_random(MIB as usize, 12))]);
    replicate(&server, &creds, "m", &src, &v1, 1);
    let v2 = server.dir.join("v2.raw");
    changed(&v1, &v2, &[(3 * MIB, pseudo_random(8192, 13))]);
    replicate(&server, &creds, "m", &v1, &v2, 2);
    server.cli_ok(&["merge", "--vm", "m", "--all"]);

    // Superseded chunks exist now, but all of them are young.
    let dry = gc(&server, &["--dry-run", "--grace", "0"]);
    assert!(freed(&dry) >= 3, "{dry}");
    let r = gc(&server, &[]);
    assert_eq!(freed(&r), 0, "the default grace frees nothing young: {r}");
    assert!(r["kept_young"]["objects"].as_u64().unwrap() >= freed(&dry));

    // A resync replaces blocks too: change the source in place and resynchronize.
    let cur = server.dir.join("cur.raw");
    changed(
        &v2,
        &cur,
        &[
            (5 * MIB + 100, pseudo_random(300_000, 14)),
            (2 * MIB, vec![0u8; MIB as usize]),
        ],
    );
    server.cli_ok(&["resync", "--vm", "m", "--now"]);
    server.cli_ok(&[
        "agent",
        "resync",
        "--creds",
        s(&creds),
        "--vm",
        "m",
        "--disk",
        "d",
        s(&cur),
    ]);
    let pts = points(&server, "m");
    let latest = pts.last().unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(
        export(&server, "m", &latest).unwrap(),
        std::fs::read(&cur).unwrap()
    );
    server.cli_ok(&["merge", "--vm", "m", "--all"]);

    let chunks_before = server.vault_objects("chunks").len();
    let r = gc(&server, &["--grace", "0"]);
    assert!(
        freed(&r) > 0 && r["freed"]["chunk"]["objects"].as_u64().unwrap() > 0,
        "{r}"
    );
    // Exactly what the one retained point needs is left.
    let want = std::fs::read(&cur).unwrap();
    let chunks = server.vault_objects("chunks");
    assert_eq!(
        chunks.len(),
        distinct_blocks(&want),
        "before: {chunks_before}"
    );
    assert_eq!(
        server.vault_objects("maps").len(),
        2,
        "one root, one segment"
    );
    assert!(server.vault_objects("logs").is_empty() && server.vault_objects("stage").is_empty());
    for p in points(&server, "m") {
        let id = p["id"].as_str().unwrap();
        assert_eq!(export(&server, "m", id).unwrap(), want, "{id}");
    }
    assert_eq!(freed(&gc(&server, &["--grace", "0"])), 0);
    let (r, clean) = verify(&server);
    assert!(clean, "{r}");
}

#[test]
fn gc_racing_an_initial_replication_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let creds = server.add_host("hv", None);
    // Garbage that the new VM's blocks deduplicate against: "old" is protected from x.raw,
    // then half its blocks are overwritten and merged, so x's chunks for them are unreferenced.
    let x = server.dir.join("x.raw");
    raw_image(&x, 32 * MIB, &[(0, 32 * MIB as usize)], 21);
    protect(&server, &creds, "old", &x);
    let y = server.dir.join("y.raw");
    let writes: Vec<(u64, Vec<u8>)> = (0..16)
        .map(|i| (2 * i * MIB, pseudo_random(MIB as usize, 100 + i)))
        .collect();
    changed(&x, &y, &writes);
    replicate(&server, &creds, "old", &x, &y, 1);
    server.cli_ok(&["merge", "--vm", "old", "--all"]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, dir, data_dir) = (stop.clone(), server.dir.clone(), server.data_dir.clone());
    let collector = std::thread::spawn(move || {
        let mut runs = 0u32;
        let mut freed_total = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) || runs < 2 {
            let o = std::process::Command::new(BIN)
                .args(["gc", "--json", "--grace", "0"])
                .env("DRVAULT_DATA_DIR", &data_dir)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let r: Value = serde_json::from_slice(&o.stdout).unwrap();
            freed_total += freed(&r);
            runs += 1;
        }
        (runs, freed_total)
    });
    protect(&server, &creds, "new", &x);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (runs, freed_total) = collector.join().unwrap();
    assert!(runs >= 2);
    assert!(freed_total > 0, "the collections had garbage to collect");
    assert_eq!(
        export(&server, "new", "c0").unwrap(),
        std::fs::read(&x).unwrap()
    );
    assert_eq!(
        export(&server, "old", "c1").unwrap(),
        std::fs::read(&y).unwrap()
    );
    let (r, clean) = verify(&server);
    assert!(clean, "{r}");
}

#[test]
fn scheduled_gc_collects_what_a_merge_superseded() {
    // A collection every second with no grace: the schedule alone must clean up after a merge,
    // while it races the replication and merge below (the write fence keeps them safe).
    let t = tempfile::tempdir().unwrap();
    let config = format!("{CONFIG}\n[gc]\ninterval_s = 1\ngrace_s = 0\n");
    let server = Server::start(t.path(), Some(&config));
    let creds = server.add_host("hv", None);
    let src = server.dir.join("src.raw");
    raw_image(&src, 4 * MIB, &[(0, 4 * MIB as usize)], 21);
    protect(&server, &creds, "m", &src);
    let v1 = server.dir.join("v1.raw");
    changed(
        &src,
        &v1,
        &[(MIB + 4096, pseudo_random(2 * MIB as usize, 22))],
    );
    replicate(&server, &creds, "m", &src, &v1, 1);
    server.cli_ok(&["merge", "--vm", "m", "--all"]);
    let want = std::fs::read(&v1).unwrap();
    eventually(
        std::time::Duration::from_secs(60),
        "the gc schedule collects the merged logs and their chunks",
        || {
            let (chunks, logs) = (server.vault_objects("chunks"), server.vault_objects("logs"));
            if chunks.len() == distinct_blocks(&want) && logs.is_empty() {
                return Ok(());
            }
            Err(format!(
                "{} chunks, want {}; logs {logs:?}",
                chunks.len(),
                distinct_blocks(&want)
            ))
        },
    );
    let jobs: Value = serde_json::from_str(&server.cli_ok(&["jobs", "--json"])).unwrap();
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "garbage_collection" && j["state"] == "succeeded"),
        "{jobs}"
    );
    for p in points(&server, "m") {
        let id = p["id"].as_str().unwrap();
        assert_eq!(export(&server, "m", id).unwrap(), want, "{id}");
    }
}

/// `drvault vms --json` entry of one VM: (health, reasons joined).
fn health(server: &Server, vm: &str) -> (String, String) {
    let v: Value = serde_json::from_str(&server.cli_ok(&["vms", vm, "--json"])).unwrap();
    let reasons: Vec<&str> = v["health_reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    (
        v["health"].as_str().unwrap().to_string(),
        reasons.join("; "),
    )
}

#[test]
fn damage_shows_in_health_and_protecting_the_same_source_heals_it() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let creds = server.add_host("hv", None);
    let img = server.dir.join("h-0.raw");
    raw_image(&img, 4 * MIB, &[(0, 4 * MIB as usize)], 31);
    let chunks = new_objects(&server, "chunks", || protect(&server, &creds, "h", &img));
    assert_eq!(chunks.len(), 4);
    let img1 = server.dir.join("h-1.raw");
    changed(&img, &img1, &[(8192, pseudo_random(4096, 32))]);
    let log = new_objects(&server, "logs", || {
        replicate(&server, &creds, "h", &img, &img1, 1)
    });
    let models = [std::fs::read(&img).unwrap(), std::fs::read(&img1).unwrap()];
    let (r, clean) = verify(&server);
    assert!(clean, "{r}");
    assert_eq!(health(&server, "h"), ("Normal".to_string(), String::new()));

    // Some points damaged (c1's log frame): Warning, naming the damaged point and what heals it.
    let frame = log.iter().find(|k| !k.ends_with("extents")).unwrap();
    let original = std::fs::read(vault_path(&server, frame)).unwrap();
    harm(&server, Harm::Flip, frame, "");
    let (_, clean) = verify(&server);
    assert!(!clean);
    let (h, why) = health(&server, "h");
    assert_eq!(h, "Warning", "{why}");
    assert!(
        why.contains("recovery point(s) c1 damaged") && why.contains("the latest c0"),
        "{why}"
    );
    // A log is not re-sent by protect: the message says what does bring the point back.
    let e = export(&server, "h", "c1").unwrap_err();
    assert!(
        e.contains("point_damaged") && e.contains("restore the damaged") && e.contains("resync"),
        "{e}"
    );
    std::fs::write(vault_path(&server, frame), &original).unwrap();
    let (r, clean) = verify(&server);
    assert!(clean, "{r}");
    assert_eq!(health(&server, "h").0, "Normal");

    // Every point damaged (every chunk of the base): Critical, in the CLI, the API and /metrics.
    for k in &chunks {
        harm(&server, Harm::Flip, k, "");
    }
    let (r, clean) = verify(&server);
    assert!(!clean, "{r}");
    let (h, why) = health(&server, "h");
    assert_eq!(h, "Critical", "{why}");
    assert!(
        why.contains("no restorable recovery point: c0, c1 damaged")
            && why.contains("agent protect"),
        "{why}"
    );
    let table = server.cli_ok(&["vms"]);
    let row = table.lines().find(|l| l.starts_with("h ")).unwrap();
    assert!(
        row.contains("Critical") && row.contains("no restorable recovery point"),
        "{table}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api: Value = rt
        .block_on(server.operator().get_json("/v1/vms/h"))
        .unwrap();
    assert_eq!(api["health"], "Critical", "{api}");
    let (m, _) = rt
        .block_on(server.operator().get_bytes("/metrics"))
        .unwrap();
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.lines().any(|l| l == "drvault_vm_health{vm=\"h\"} 2"),
        "{}",
        m.lines()
            .filter(|l| l.contains("vm_health"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let e = export(&server, "h", "c0").unwrap_err();
    assert!(
        e.contains("point_damaged") && e.contains("agent protect again"),
        "{e}"
    );

    // Protecting the same source again re-sends the blocks of the quarantined chunks: they are
    // stored again, the points read back exactly and health is Normal with no verify in between.
    protect(&server, &creds, "h", &img);
    for k in &chunks {
        assert!(vault_path(&server, k).exists(), "{k} was not stored again");
    }
    assert_eq!(health(&server, "h"), ("Normal".to_string(), String::new()));
    for (i, p) in points(&server, "h").iter().enumerate() {
        assert_eq!(p["damaged"], false, "{p}");
        let id = p["id"].as_str().unwrap();
        assert!(export(&server, "h", id).unwrap() == models[i], "{id}");
    }
    let (r, clean) = verify(&server);
    assert!(clean, "{r}");
    let healed: BTreeSet<String> = r["healed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(healed, set(&chunks));
}

/// Writes a fake staging file (`<key>#<n>`, as a killed write leaves) with the given age.
fn staging_file(server: &Server, name: &str, len: usize, age_s: u64) -> PathBuf {
    let p = vault_path(server, name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, vec![0x5a; len]).unwrap();
    let mtime = std::time::SystemTime::now() - std::time::Duration::from_secs(age_s);
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    p
}

#[test]
fn gc_and_restarts_remove_staging_leftovers_of_killed_writes() {
    let t = tempfile::tempdir().unwrap();
    let server = Server::start(t.path(), Some(CONFIG));
    let creds = server.add_host("hv", None);
    let img = server.dir.join("s.raw");
    raw_image(&img, 4 * MIB, &[(0, 2 * MIB as usize)], 41);
    protect(&server, &creds, "s", &img);
    let chunk = server.vault_objects("chunks")[0].clone();
    let record = latest_records(&server)[0].clone();
    let two_days = 2 * 24 * 3600;
    let old = [
        staging_file(&server, &format!("{chunk}#1"), 4 * MIB as usize, two_days),
        staging_file(&server, "stage/v/d/s/7#2", 72, two_days),
        staging_file(&server, &format!("{record}#3"), 1000, two_days),
    ];
    let old_bytes = 4 * MIB + 72 + 1000;
    // A write in flight: its staging file is fresh, whatever the grace period.
    let fresh = staging_file(&server, &format!("{chunk}#2"), 4096, 0);

    let text = server.cli_ok(&["gc", "--dry-run"]);
    assert!(
        text.contains("would remove 3 staging files of interrupted writes"),
        "{text}"
    );
    assert!(old.iter().all(|p| p.exists()), "a dry run removed files");
    let r = gc(&server, &["--grace", "0"]);
    assert_eq!(r["staging_leftovers"]["objects"], 3, "{r}");
    assert_eq!(r["staging_leftovers"]["bytes"], old_bytes, "{r}");
    for p in &old {
        assert!(!p.exists(), "{} left", p.display());
    }
    assert!(
        fresh.exists(),
        "gc removed the staging file of a write in flight"
    );
    assert_eq!(
        export(&server, "s", "c0").unwrap(),
        std::fs::read(&img).unwrap()
    );
    let (r, clean) = verify(&server);
    assert!(clean, "{r}");

    // A restart removes what no write of the new process can own.
    let server = server.restart_clean(Some(CONFIG));
    assert!(!fresh.exists(), "the restart left {}", fresh.display());
    assert_eq!(
        export(&server, "s", "c0").unwrap(),
        std::fs::read(&img).unwrap()
    );
}
