//! cli_conventions tests (issue 21): shell completions and man pages generated from the clap
//! definitions, `--json` on every listing, the exit-code table, and the systemd units.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;
use serde_json::Value;

fn drvault(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run drvault")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The bash script, sourced in bash, registers a completion for `drvault`, and its function
/// offers `serve` for `drvault se<TAB>` and the failover subcommands after `failover`.
#[test]
fn bash_completion_completes_subcommands() {
    let t = tempfile::tempdir().unwrap();
    let script = t.path().join("drvault.bash");
    let o = drvault(&["completions", "bash"]);
    std::fs::write(&script, succeeded(&o, "completions bash")).unwrap();
    let complete = |line: &str| -> String {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            r#"source "$1" || exit 9
complete -p drvault || exit 8
COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE="{line}"; COMP_POINT={point}
func=$(complete -p drvault | sed -E 's/.*-F ([^ ]+).*/\1/')
"$func" drvault "{cur}" "{prev}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
            words = words.join(" "),
            cword = words.len() - 1,
            point = line.len(),
            cur = words[words.len() - 1],
            prev = words[words.len() - 2],
        );
        let o = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &program, "bash"])
            .arg(&script)
            .output()
            .unwrap();
        succeeded(&o, &format!("completing {line:?}"))
    };
    let offered = complete("drvault se");
    assert!(offered.lines().any(|l| l == "serve"), "{offered}");
    let offered = complete("drvault failover c");
    for sub in ["cleanup", "commit", "cancel"] {
        assert!(offered.lines().any(|l| l == sub), "{sub}: {offered}");
    }
}

/// zsh and fish scripts are generated too, and name the commands.
#[test]
fn zsh_and_fish_completions_are_generated() {
    for shell in ["zsh", "fish"] {
        let out = succeeded(&drvault(&["completions", shell]), shell);
        assert!(out.contains("serve") && out.contains("failover"), "{shell}");
    }
    let o = drvault(&["completions", "tcsh"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// `groff -man -ww` (all warnings; `-k`: the page is UTF-8, as man's own preconv step reads
/// it) renders a page with nothing on stderr; `man -l` too, when installed.
fn renders_cleanly(page: &Path) {
    let o = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .arg(page)
        .output()
        .expect("groff (apt-get install groff-base)");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}: {}",
        page.display(),
        text(&o.stderr)
    );
    if let Ok(o) = Command::new("man")
        .args(["--warnings", "-l"])
        .arg(page)
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
    {
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "man -l {}: {}",
            page.display(),
            text(&o.stderr)
        );
    }
}

/// `drvault man` prints drvault(1); `--dir` writes a page per command and subcommand; every
/// page renders without a warning, and the top page carries the exit-code table.
#[test]
fn man_pages_render_without_warnings() {
    let t = tempfile::tempdir().unwrap();
    let top = t.path().join("drvault.1");
    std::fs::write(&top, succeeded(&drvault(&["man"]), "man")).unwrap();
    renders_cleanly(&top);
    let rendered = Command::new("groff")
        .args(["-k", "-man", "-Tutf8"])
        .arg(&top)
        .output()
        .unwrap();
    let rendered = text(&rendered.stdout);
    assert!(rendered.contains("Exit codes"), "{rendered}");

    let dir = t.path().join("man1");
    succeeded(
        &drvault(&["man", "--dir", dir.to_str().unwrap()]),
        "man --dir",
    );
    let mut pages: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for want in [
        "drvault.1",
        "drvault-serve.1",
        "drvault-failover.1",
        "drvault-failover-commit.1",
        "drvault-agent-protect.1",
    ] {
        assert!(pages.iter().any(|p| p == want), "{want} in {pages:?}");
    }
    for p in &pages {
        renders_cleanly(&dir.join(p));
    }
}

/// The exit codes of `drvault --help` are the README's "Exit codes" table, code for code.
#[test]
fn exit_code_table_is_the_same_in_help_and_readme() {
    let help = succeeded(&drvault(&["--help"]), "--help");
    let codes_in = |s: &str, prefix: &str| -> Vec<String> {
        s.lines()
            .skip_while(|l| !l.starts_with(prefix))
            .skip(1)
            .map_while(|l| {
                let l = l.trim().trim_start_matches('|').trim();
                let code = l.split(|c: char| !c.is_ascii_digit()).next()?;
                (!code.is_empty()).then(|| code.to_string())
            })
            .collect()
    };
    let in_help = codes_in(&help, "Exit codes:");
    assert_eq!(
        in_help,
        ["0", "1", "2", "3", "4", "5", "6", "7", "141"],
        "{help}"
    );
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## Exit codes")
        .nth(1)
        .expect("README section Exit codes");
    // The table starts after its header and separator rows.
    let table: String = section
        .lines()
        .skip_while(|l| !l.starts_with("|---"))
        .skip(1)
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(codes_in(&format!("x\n{table}"), "x"), in_help, "{section}");
}

/// A few failures, each with the code the table gives it.
#[test]
fn failures_exit_with_the_code_of_the_table() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, None);
    let code = |o: &Output| (o.status.code(), text(&o.stderr));

    // 2: usage.
    let (c, err) = code(&server.cli(&["vms", "--no-such-option"]));
    assert_eq!(c, Some(2), "{err}");

    // 4: refused by the server (404 vm_not_found).
    let (c, err) = code(&server.cli(&["vms", "nosuchvm"]));
    assert_eq!(c, Some(4), "{err}");
    assert!(err.contains("vm_not_found"), "{err}");
    // A refusal reported through the agent is the same code: credentials whose token the
    // server does not know (401).
    let creds = server.add_host("hv01", None);
    let forged = dir.join("forged.creds.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
    c["token"] = Value::String(format!("{}x", c["token"].as_str().unwrap()));
    std::fs::write(&forged, c.to_string()).unwrap();
    let img = dir.join("d.raw");
    raw_image(&img, 1024 * 1024, &[(0, 4096)], 3);
    let (c, err) = code(&server.cli(&[
        "agent",
        "protect",
        "--creds",
        forged.to_str().unwrap(),
        "--vm",
        "web01",
        "--disk",
        img.to_str().unwrap(),
    ]));
    assert_eq!(c, Some(4), "{err}");

    // 6: a job the command followed failed (a plan whose pre-command fails).
    server.protect(&creds, "web01", &format!("{}:d", img.display()), &[]);
    server.cli_ok(&[
        "plan", "create", "p", "--group", "web01", "--pre", "1:exit 3",
    ]);
    let (c, err) = code(&server.cli(&["failover", "--plan", "p", "--kind", "test"]));
    assert_eq!(c, Some(6), "{err}");

    // 5: unreachable (a port nothing listens on).
    let port = free_port();
    let (c, err) = code(&server.cli(&["vms", "--server", &format!("https://127.0.0.1:{port}")]));
    assert_eq!(c, Some(5), "{err}");
    assert!(err.contains("cannot reach the server"), "{err}");

    // 1: anything else (no server file where --data-dir points).
    let (c, err) = code(&server.cli(&["vms", "--data-dir", dir.join("nowhere").to_str().unwrap()]));
    assert_eq!(c, Some(1), "{err}");
}

/// Every listing's `--json` is JSON.
#[test]
fn every_listing_prints_json() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let network = "[[network]]\nname = \"drill-vnet\"\naddress_space = [\"10.99.0.0/16\"]\nisolated = true\n  [[network.subnet]]\n  name = \"app\"\n  prefix = \"10.99.1.0/24\"\n";
    let server = Server::start(dir, Some(network));
    let creds = server.add_host("hv01", None);
    server.cli_ok(&["provider", "add", "vmm01", "--cloud", "prod"]);
    let img = dir.join("d.raw");
    raw_image(&img, 1024 * 1024, &[(0, 4096)], 5);
    server.protect(&creds, "web01", &format!("{}:d", img.display()), &[]);
    server.cli_ok(&["plan", "create", "p", "--group", "web01"]);
    let job = {
        let jobs: Value = serde_json::from_str(&server.cli_ok(&["jobs", "--json"])).unwrap();
        jobs[0]["id"].as_str().unwrap().to_string()
    };
    for args in [
        &["status"][..],
        &["vms"],
        &["vms", "web01"],
        &["jobs"],
        &["jobs", &job],
        &["host", "list"],
        &["provider", "list"],
        &["plan", "list"],
        &["points", "--vm", "web01"],
        &["key", "list"],
        &["damage"],
        &["verify"],
        &["gc", "--dry-run"],
        &["network", "show", "drill-vnet"],
        &["account", "list"],
        &["account", "whoami"],
    ] {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let out = server.cli_ok(&with_json);
        let v: Result<Value, _> = serde_json::from_str(&out);
        assert!(
            v.is_ok(),
            "drvault {}: not JSON: {out}",
            with_json.join(" ")
        );
    }
}

/// `systemd-analyze verify` accepts both units, with ExecStart pointing at the built binary
/// (so the check that it exists and is executable is real), and prints no warning.
#[test]
fn systemd_units_verify_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for unit in ["drvault.service", "drvault-agent.service"] {
        let original = std::fs::read_to_string(root.join("config").join(unit)).unwrap();
        assert!(
            original.contains("ExecStart=/usr/local/bin/drvault "),
            "{unit}"
        );
        let copy = t.path().join(unit);
        std::fs::write(
            &copy,
            original.replace(
                "ExecStart=/usr/local/bin/drvault ",
                &format!("ExecStart={BIN} "),
            ),
        )
        .unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("systemd-analyze (apt-get install systemd)");
        assert!(
            o.status.success() && o.stderr.is_empty() && o.stdout.is_empty(),
            "{unit}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
    // The check is not blind: an unknown key is a warning it prints.
    let bad = t.path().join("bad.service");
    std::fs::write(
        &bad,
        format!("[Service]\nExecStart={BIN} serve\nNoSuchKey=1\n"),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.stderr.is_empty());
}
