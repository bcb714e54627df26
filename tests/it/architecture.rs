//! The module structure the crate doc describes, checked on the source: the top-level modules
//! form no import cycle, the wire contract depends on nothing else in the crate, and the agent
//! and the client reach the server only through HTTP (they never import `api`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module name → (module it refers to → files that do), test modules left out.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

/// The source without comments and without `#[cfg(test)] mod …` (tests may use anything).
fn production_code(text: &str) -> String {
    let cut = text
        .match_indices("#[cfg(test)]\n")
        .find(|(i, m)| {
            let rest = text[i + m.len()..].trim_start();
            rest.starts_with("mod ") || rest.starts_with("pub(crate) mod ")
        })
        .map_or(text.len(), |(i, _)| i);
    text[..cut]
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names after `crate::` in `code`, including each of `crate::{a, b::c}`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                refs.insert(name);
            }
        } else {
            refs.insert(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    refs.retain(|r| !r.is_empty());
    refs
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g = Graph::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut files = Vec::new();
        rust_files(&path, &mut files);
        let deps = g.entry(name.clone()).or_default();
        for f in files {
            let code = production_code(&std::fs::read_to_string(&f).unwrap());
            for r in crate_refs(&code) {
                if r != name {
                    let rel = f.strip_prefix(&src).unwrap().display().to_string();
                    deps.entry(r).or_default().insert(rel);
                }
            }
        }
    }
    let known: BTreeSet<String> = g.keys().cloned().collect();
    for deps in g.values_mut() {
        deps.retain(|m, _| known.contains(m));
    }
    g
}

/// A cycle through `start`, if there is one (depth-first search over the module graph).
fn cycle_through(g: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &Graph,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g[at].keys() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn top_level_modules_form_no_import_cycle() {
    let g = graph();
    assert!(g.len() > 10, "modules not found: {g:?}");
    for m in g.keys() {
        if let Some(cycle) = cycle_through(&g, m) {
            let hops: Vec<String> = cycle
                .iter()
                .zip(cycle.iter().cycle().skip(1))
                .map(|(a, b)| format!("{a} -> {b} ({:?})", g[a][b]))
                .collect();
            panic!("import cycle:\n  {}", hops.join("\n  "));
        }
    }
}

#[test]
fn the_wire_contract_depends_on_nothing_else_in_the_crate() {
    let g = graph();
    assert_eq!(g["wire"], BTreeMap::new(), "wire imports server modules");
}

#[test]
fn the_agent_and_the_client_reach_the_server_only_over_http() {
    let g = graph();
    for side in ["agent", "client"] {
        for server_side in [
            "api", "server", "services", "ingest", "catalog", "scrub", "failover",
        ] {
            assert!(
                !g[side].contains_key(server_side),
                "{side} imports {server_side}: {:?}",
                g[side][server_side]
            );
        }
    }
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    let refs = crate_refs("use crate::{a::B, c};\nfn f() { crate::d::e(); }");
    assert_eq!(refs, ["a", "c", "d"].map(String::from).into());
    let code =
        production_code("use crate::x; // crate::y\n#[cfg(test)]\nmod tests { use crate::z; }");
    assert_eq!(crate_refs(&code), ["x"].map(String::from).into());
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")] {
        g.entry(a.into()).or_default().entry(b.into()).or_default();
        g.entry(b.into()).or_default();
    }
    assert_eq!(cycle_through(&g, "a").unwrap(), ["a", "b", "c"]);
    assert_eq!(cycle_through(&g, "d"), None);
}
