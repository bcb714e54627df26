//! Failed-over VMs booted by drvault's own generated definition on their target networks,
//! inside network namespaces the tests create.
//!
//! Every address contacted here lives in a namespace the test made (`ip netns add`), which is
//! deleted on drop, with everything running in it, even when the test fails.

use crate::common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// 1 MiB blocks and the shared test networks (fixtures/networks.toml).
const NETWORKS: &str = concat!(
    "[vault]\nblock_size = 1048576\n\n",
    include_str!("../../fixtures/networks.toml")
);

const NET_BEGIN: &str = "==DRVAULT-NET-BEGIN==";
const NET_END: &str = "==DRVAULT-NET-END==";

/// A booted guest takes 15-25 s under TCG here; three at once on a loaded 2-core machine,
/// several times that.
const BOOT_WITHIN: Duration = Duration::from_secs(300);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/boot-disk")
        .join(name)
}

/// A network namespace of this test, deleted on drop with every process in it.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("drvault-t{}-{}", std::process::id(), rand_suffix());
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, argv: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("ip netns exec")
    }

    fn exec_ok(&self, argv: &[&str]) -> String {
        succeeded(&self.exec(argv), &format!("{argv:?} in {}", self.name))
    }

    /// One ping from `from` (an address of the namespace) to `to`.
    fn ping(&self, from: &str, to: &str) -> Result<(), String> {
        let o = self.exec(&["ping", "-c", "1", "-W", "2", "-I", from, to]);
        if o.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&o.stdout).into_owned())
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // dnsmasq and qemu run in it; a namespace with live processes would outlive `del`.
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/run/drvault/network").join(&self.name));
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 % 100_000)
        .unwrap_or(0)
}

/// A guest started by a failover's own qemu.sh, its serial console collected as it comes.
struct Guest {
    what: String,
    child: Child,
    stdin: ChildStdin,
    console: Arc<Mutex<String>>,
}

impl Guest {
    fn start(ns: &Netns, what: &str, qemu_sh: &Path, accel: &str) -> Guest {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sh"])
            .arg(qemu_sh)
            .env("DRVAULT_ACCEL", accel)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu.sh");
        let console = Arc::new(Mutex::new(String::new()));
        for mut out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let console = console.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                    console.lock().unwrap().push_str(&text);
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        Guest {
            what: what.to_string(),
            child,
            stdin,
            console,
        }
    }

    fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    fn tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until the console shows `text`.
    fn wait_for(&mut self, text: &str) {
        let what = format!("{} shows {text:?}", self.what);
        eventually(BOOT_WITHIN, &what, || {
            if self.console().contains(text) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{}: qemu.sh ended ({status}):\n{}", self.what, self.tail());
            }
            Err(self.tail())
        })
    }

    /// The line the guest printed between the network markers: `eth0 ADDR/LEN ROUTER HOSTNAME`.
    fn wait_address(&mut self) -> String {
        let what = format!("{} prints the address DHCP gave it", self.what);
        eventually(BOOT_WITHIN, &what, || {
            let c = self.console();
            if let Some(line) = c
                .split(NET_BEGIN)
                .nth(1)
                .and_then(|rest| rest.split(NET_END).next())
                .map(|s| s.trim().to_string())
                .filter(|_| c.contains(NET_END))
            {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{}: qemu.sh ended ({status}):\n{}", self.what, self.tail());
            }
            Err(self.tail())
        })
    }

    /// Runs `cmd` in the guest's console shell; its exit status.
    fn shell(&mut self, tag: &str, cmd: &str) -> i32 {
        let line = format!("{cmd} >/dev/null 2>&1; echo \"PROBE-{tag} rc=$?\"\n");
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let needle = format!("PROBE-{tag} rc=");
        let what = format!("{}: `{cmd}` finishes", self.what);
        eventually(Duration::from_secs(60), &what, || {
            let c = self.console();
            // The console echoes the typed line too, with `$?` where the answer has a number.
            c.match_indices(&needle)
                .filter_map(|(i, _)| {
                    let rest = &c[i + needle.len()..];
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    digits.parse::<i32>().ok()
                })
                .next()
                .ok_or_else(|| self.tail())
        })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // The namespace's drop kills qemu itself; this ends the shell around it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// KVM when it boots the fixture here, else TCG: some machines have a /dev/kvm whose guests
/// hang in the BIOS, so "usable" means a disk boots to its marker within a short deadline.
fn accel(disk: &Path) -> &'static str {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return "tcg";
    }
    let o = Command::new("timeout")
        .args(["20", "qemu-system-x86_64", "-accel", "kvm", "-m", "256"])
        .args(["-nographic", "-no-reboot", "-nic", "none", "-drive"])
        .arg(format!("file={},format=raw,snapshot=on", disk.display()))
        .stdin(Stdio::null())
        .output()
        .expect("qemu-system-x86_64");
    if String::from_utf8_lossy(&o.stdout).contains("==DRVAULT-MARKER-END==") {
        "kvm"
    } else {
        eprintln!("failover_network: /dev/kvm does not boot the fixture here; using TCG");
        "tcg"
    }
}

fn failover(server: &Server, vm: &str, kind: &str) -> (Value, PathBuf) {
    server.cli_ok(&["failover", "--vm", vm, "--kind", kind]);
    let v: Value =
        serde_json::from_str(&server.cli_ok(&["failover", "show", "--vm", vm, "--json"])).unwrap();
    let dir = PathBuf::from(v["record"]["output_dir"].as_str().unwrap());
    (v, dir)
}

fn protect(server: &Server, creds: &str, vm: &str, img: &Path, nic: &str) {
    server.protect(
        Path::new(creds),
        vm,
        &format!("{}:os", img.display()),
        &[
            "--generation",
            "1",
            "--cpus",
            "1",
            "--memory-mib",
            "256",
            "--nic",
            nic,
        ],
    );
}

#[test]
fn failed_over_vms_boot_from_the_generated_qemu_sh_on_their_target_networks() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let server = Server::start(dir, Some(NETWORKS));
    let creds = server.add_host("hv", None);
    let c = creds.to_str().unwrap();
    let img = dir.join("boot.raw");
    std::fs::write(dir.join("m.txt"), "network boot\n").unwrap();
    run(
        "bash",
        &[
            fixture("make-boot-disk.sh").to_str().unwrap(),
            img.to_str().unwrap(),
            dir.join("m.txt").to_str().unwrap(),
        ],
    );
    // app01's source address fits the recovery subnet (kept); app02's does not (next free).
    protect(
        &server,
        c,
        "app01",
        &img,
        "network=corp,mac=00:15:5d:00:00:07,ip=10.20.1.25",
    );
    protect(
        &server,
        c,
        "app02",
        &img,
        "network=corp,mac=00:15:5d:00:00:08,ip=192.168.50.9",
    );
    let accel = accel(&img);

    let ns = Netns::new();
    // A host that routes between its networks: isolation must not depend on it not doing so.
    ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    let net = |args: &[&str]| {
        let mut a = vec!["network"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--netns", &ns.name]);
        server.cli_ok(&a)
    };

    // The drill first: a VM has one failover at a time, and the drill's VM keeps running on
    // its isolated network after cleanup (qemu holds its disk open).
    let (drill_view, drill_dir) = failover(&server, "app01", "test");
    let drill_nic = &drill_view["definition"]["nics"][0];
    assert_eq!(drill_nic["network"], "drill-vnet");
    let drill_ip = drill_nic["ip"].as_str().unwrap().to_string();
    assert_eq!(drill_ip, "10.99.1.4", "first free address of the drill /29");
    let hosts = std::fs::read_to_string(drill_dir.join("dhcp-hosts-drill-vnet.app.conf")).unwrap();
    assert_eq!(hosts, "00:15:5d:00:00:07,10.99.1.4,app01\n");
    let out = net(&["up", "drill-vnet"]);
    assert!(out.contains("isolated"), "{out}");
    let mut drill = Guest::start(&ns, "drill of app01", &drill_dir.join("qemu.sh"), accel);
    // qemu opens its disks before the BIOS runs; from then on the files may go.
    drill.wait_for("SeaBIOS");
    server.cli_ok(&["failover", "cleanup", "--vm", "app01"]);

    let (v1, dir1) = failover(&server, "app01", "unplanned");
    assert_eq!(v1["definition"]["nics"][0]["ip"], "10.20.1.25");
    assert_eq!(v1["definition"]["nics"][0]["rule"], "kept_source");
    let (v2, dir2) = failover(&server, "app02", "unplanned");
    assert_eq!(
        v2["definition"]["nics"][0]["ip"], "10.20.1.4",
        "first address after the reserved .0-.3"
    );
    assert_eq!(v2["definition"]["nics"][0]["rule"], "next_free");
    let shown: Value =
        serde_json::from_str(&server.cli_ok(&["network", "show", "recovery-vnet", "--json"]))
            .unwrap();
    let reservations: Vec<(String, String)> = shown["subnets"][0]["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["mac"].as_str().unwrap().to_string(),
                r["ip"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reservations,
        [
            ("00:15:5d:00:00:08".to_string(), "10.20.1.4".to_string()),
            ("00:15:5d:00:00:07".to_string(), "10.20.1.25".to_string())
        ]
    );
    net(&["up", "recovery-vnet"]);
    let mut app01 = Guest::start(&ns, "app01", &dir1.join("qemu.sh"), accel);
    let mut app02 = Guest::start(&ns, "app02", &dir2.join("qemu.sh"), accel);

    // Each guest got the address drvault allocated, by DHCP, from its own network's gateway.
    assert_eq!(
        drill.wait_address(),
        format!("eth0 {drill_ip}/29 10.99.1.1 app01")
    );
    assert_eq!(app01.wait_address(), "eth0 10.20.1.25/24 10.20.1.1 app01");
    assert_eq!(app02.wait_address(), "eth0 10.20.1.4/24 10.20.1.1 app02");
    for (from, to) in [
        ("10.20.1.1", "10.20.1.25"),
        ("10.20.1.1", "10.20.1.4"),
        ("10.99.1.1", drill_ip.as_str()),
    ] {
        eventually(
            Duration::from_secs(60),
            &format!("{to} answers ping from {from}"),
            || ns.ping(from, to),
        );
    }

    // The recovery VMs reach each other; the drill reaches its gateway and nothing of the
    // recovery network, although the host forwards.
    assert_eq!(app01.shell("peer", "ping -c 1 -W 3 10.20.1.4"), 0);
    assert_eq!(drill.shell("gw", "ping -c 1 -W 3 10.99.1.1"), 0);
    assert_ne!(drill.shell("vm", "ping -c 1 -W 3 10.20.1.25"), 0);
    assert_ne!(drill.shell("bridge", "ping -c 1 -W 3 10.20.1.1"), 0);

    net(&["down", "recovery-vnet"]);
    net(&["down", "drill-vnet"]);
    let links = ns.exec_ok(&["ip", "-o", "link", "show", "type", "bridge"]);
    assert_eq!(links.trim(), "", "down removes the bridges");
}
