//! `drvault bench failover --boot-image IMG`: the time from a test failover's request to its
//! guest answering ping on the drill network, the guest started by the failover's own
//! generated `qemu.sh` (not a hand-written command), the network set up by `drvault network up`
//! inside a network namespace the bench creates and deletes.
//!
//! The baseline is the boot alone in the same round: from starting `qemu.sh` to the first ping
//! answer. Every tool that brings a VM up pays it; the ratio shows what the failover (choosing
//! the point, materializing the disk, allocating the address, the network's DHCP) adds to it.
//!
//! Needs root (network namespaces, bridges, taps), `ip`, `ping`, `dnsmasq`, `nft` and
//! `qemu-system-x86_64`. The image must boot and take its address by DHCP on its first NIC:
//! `fixtures/boot-disk/make-boot-disk.sh IMG MARKER` makes one. Only addresses inside the
//! namespace are contacted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Serialize;

use super::server::RunClients;
use super::{io_err, BenchError};
use crate::wire::NicSpec;

/// The target networks of the spawned server: the source network `corp` fails over to
/// `recovery-vnet/app`, and its drills to the isolated `drill-vnet/app`.
pub const NETWORKS: &str = r#"
[[network]]
name = "recovery-vnet"
address_space = ["10.20.0.0/16"]
  [[network.subnet]]
  name = "app"
  prefix = "10.20.1.0/24"
  gateway = "10.20.1.1"

[[network]]
name = "drill-vnet"
address_space = ["10.99.0.0/16"]
isolated = true
  [[network.subnet]]
  name = "app"
  prefix = "10.99.1.0/24"
  gateway = "10.99.1.1"

[[mapping]]
source = "corp"
target = "recovery-vnet/app"
test_target = "drill-vnet/app"
"#;

const DRILL_NETWORK: &str = "drill-vnet";
/// A guest under TCG on a loaded 2-core machine boots in well under this.
const PING_WITHIN: Duration = Duration::from_secs(600);

/// The NIC the boot VM is protected with (its source address is kept on recovery, and a drill
/// gets the first free address of the drill subnet).
pub fn nic() -> NicSpec {
    NicSpec {
        network: "corp".into(),
        mac: "00:15:5d:00:00:07".into(),
        ip: Some("10.20.1.25".into()),
    }
}

/// One measured boot.
#[derive(Debug, Clone, Serialize)]
pub struct BootRun {
    /// From the failover request to the first ping answer.
    pub total_s: f64,
    /// From the failover request to its job's success.
    pub job_s: f64,
    /// `drvault network up` of the drill network (bridge, dnsmasq with the reservations).
    pub network_up_s: f64,
    /// From starting the failover's qemu.sh to the first ping answer: the baseline.
    pub boot_s: f64,
    pub address: String,
    pub accel: String,
}

/// KVM when /dev/kvm opens for reading and writing, else TCG; `kvm` or `tcg` force one.
pub fn accel(choice: &str) -> &'static str {
    match choice {
        "kvm" => "kvm",
        "tcg" => "tcg",
        _ => {
            let usable = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if usable {
                "kvm"
            } else {
                "tcg"
            }
        }
    }
}

/// A network namespace of the bench, deleted on drop with every process in it.
struct Netns {
    name: String,
}

impl Netns {
    async fn new() -> Result<Netns, BenchError> {
        let name = format!("drvault-bench-{}", std::process::id());
        // A namespace left by a killed earlier run of this pid is stale: start clean.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]).await?;
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]).await?;
        Ok(ns)
    }

    async fn exec_ok(&self, argv: &[&str]) -> Result<(), BenchError> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(argv);
        run("ip", &all).await
    }

    async fn ping(&self, from: &str, to: &str) -> bool {
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "ping", "-c", "1", "-W", "1"])
            .args(["-I", from, to])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // dnsmasq and qemu run in it; a namespace with live processes would outlive `del`.
        if let Ok(o) = std::process::Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", pid])
                    .status();
            }
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/run/drvault/network").join(&self.name));
    }
}

async fn run(program: &str, args: &[&str]) -> Result<(), BenchError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| BenchError::Tool {
            tool: program.into(),
            message: format!("{e} (the boot figure needs root and {program})"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Tool {
            tool: format!("{program} {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Checks the tools the boot figure needs before anything is protected.
pub fn check_tools() -> Result<(), BenchError> {
    for tool in ["ip", "ping", "dnsmasq", "nft", "qemu-system-x86_64"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Err(BenchError::Invalid(format!(
                "--boot-image needs {tool} on PATH (apt-get install iproute2 iputils-ping dnsmasq-base nftables qemu-system-x86)"
            )));
        }
    }
    Ok(())
}

/// What one round needs of the bench's server.
pub struct BootSetup<'a> {
    pub session: &'a RunClients,
    /// This binary, for `drvault network up`.
    pub exe: &'a Path,
    /// The spawned server's data directory (its server.json and operator token).
    pub data_dir: &'a Path,
    pub vm: &'a str,
    pub accel: &'static str,
    pub run_dir: &'a Path,
}

/// One round: test failover, network up, qemu.sh, ping until it answers; then everything in the
/// namespace is killed and the drill cleaned up.
pub async fn round(s: &BootSetup<'_>, k: usize) -> Result<BootRun, BenchError> {
    let ns = Netns::new().await?;
    let t0 = Instant::now();
    let rec: serde_json::Value = s
        .session
        .operator
        .send_json(
            Method::POST,
            &format!("/v1/vms/{}/failover", s.vm),
            &serde_json::json!({ "kind": "test" }),
        )
        .await?;
    let job = rec["job"]
        .as_str()
        .ok_or_else(|| BenchError::Server(format!("failover answer without a job: {rec}")))?;
    s.session.wait_job(job, Duration::from_millis(5)).await?;
    let job_s = t0.elapsed().as_secs_f64();
    let result = boot(s, &ns, k, t0, job_s).await;
    drop(ns);
    let cleaned: Result<serde_json::Value, _> = s
        .session
        .operator
        .send_json(
            Method::POST,
            &format!("/v1/vms/{}/failover/cleanup", s.vm),
            &serde_json::json!({}),
        )
        .await;
    let r = result?;
    cleaned?;
    Ok(r)
}

async fn boot(
    s: &BootSetup<'_>,
    ns: &Netns,
    k: usize,
    t0: Instant,
    job_s: f64,
) -> Result<BootRun, BenchError> {
    let view: serde_json::Value = s
        .session
        .operator
        .get_json(&format!("/v1/vms/{}/failover", s.vm))
        .await?;
    let address = view["definition"]["nics"][0]["ip"]
        .as_str()
        .ok_or_else(|| BenchError::Server(format!("the drill has no NIC address: {view}")))?
        .to_string();
    let dir = view["record"]["output_dir"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| BenchError::Server("the drill's record has no output_dir".into()))?;
    let network: serde_json::Value = s
        .session
        .operator
        .get_json(&format!("/v1/networks/{DRILL_NETWORK}"))
        .await?;
    let gateway = network["subnets"][0]["gateway"]
        .as_str()
        .ok_or_else(|| BenchError::Server(format!("{DRILL_NETWORK} has no gateway: {network}")))?
        .to_string();

    let t_net = Instant::now();
    let up = tokio::process::Command::new(s.exe)
        .args(["network", "up", DRILL_NETWORK, "--netns", &ns.name])
        .env("DRVAULT_DATA_DIR", s.data_dir)
        .output()
        .await
        .map_err(io_err("running", s.exe))?;
    if !up.status.success() {
        return Err(BenchError::Tool {
            tool: "drvault network up".into(),
            message: String::from_utf8_lossy(&up.stderr).trim().to_string(),
        });
    }
    let network_up_s = t_net.elapsed().as_secs_f64();

    let console = s.run_dir.join(format!("boot-{k}.console"));
    let out = std::fs::File::create(&console).map_err(io_err("creating", &console))?;
    let err = out.try_clone().map_err(io_err("opening", &console))?;
    let qemu_sh = dir.join("qemu.sh");
    let t_boot = Instant::now();
    let mut guest = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh"])
        .arg(&qemu_sh)
        .env("DRVAULT_ACCEL", s.accel)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(io_err("starting", &qemu_sh))?;
    loop {
        if ns.ping(&gateway, &address).await {
            break;
        }
        if let Ok(Some(status)) = guest.try_wait() {
            return Err(BenchError::Tool {
                tool: "qemu.sh".into(),
                message: format!(
                    "ended ({status}) before {address} answered; console in {}",
                    console.display()
                ),
            });
        }
        if t_boot.elapsed() > PING_WITHIN {
            return Err(BenchError::Tool {
                tool: "qemu.sh".into(),
                message: format!(
                    "{address} did not answer ping within {} s (accel {}); console in {}",
                    PING_WITHIN.as_secs(),
                    s.accel,
                    console.display()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let boot_s = t_boot.elapsed().as_secs_f64();
    let total_s = t0.elapsed().as_secs_f64();
    Ok(BootRun {
        total_s,
        job_s,
        network_up_s,
        boot_s,
        address,
        accel: s.accel.to_string(),
    })
}
