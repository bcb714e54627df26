//! `drvault network up|down|show NAME`: a target network on this host, as failed-over VMs'
//! qemu.sh expects it. Per subnet: a Linux bridge (the name qemu.sh uses) holding the subnet's
//! gateway address, and a dnsmasq serving only the failovers' DHCP reservations (MAC → the
//! address drvault allocated), read from the server. An isolated network's VMs reach their
//! gateway address and each other, nothing beyond (an nftables table per bridge). docs/failover-network.md
//! says how this maps to a real site.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use super::operator::Conn;
use crate::wire::{HostNetworkView, HostSubnetView};

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Create the bridges of a target network (gateway address; an isolated network's VMs reach
    /// that address and nothing else) and start a DHCP server (dnsmasq) per subnet with the
    /// current reservations; run again after a failover to refresh them. Needs root.
    Up {
        /// A `[[network]]` name from the server's config.
        name: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Stop the DHCP servers and delete the bridges `up` made.
    Down {
        name: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Print the network's subnets, bridges and reservations.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Set the network up inside this network namespace (`ip netns add NAME` first), e.g. a lab
    /// or a test that must not touch the host's own interfaces.
    #[arg(long)]
    netns: Option<String>,
    /// Where the DHCP servers keep their pid, lease, log and hosts files (default
    /// /run/drvault/network/[NETNS/]NAME). dnsmasq reads the hosts file again after dropping
    /// root, so every directory on the way must be readable by others.
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

pub async fn run(cmd: NetworkCmd, conn: Conn) -> Result<i32> {
    match cmd {
        NetworkCmd::Show { name, json } => {
            let v = conn.client()?.host_network(&name).await?;
            if json {
                super::print_json(&v)?;
            } else {
                print_view(&v);
            }
        }
        NetworkCmd::Up { name, host } => {
            let v = conn.client()?.host_network(&name).await?;
            let h = Host::new(&host, &name)?;
            for s in &v.subnets {
                h.up(&v, s)?;
                println!(
                    "{}/{}: bridge {} {}/{}, DHCP for {} reservation(s){}",
                    v.name,
                    s.name,
                    s.bridge,
                    s.gateway,
                    prefix_len(&s.prefix)?,
                    s.reservations.len(),
                    if v.isolated {
                        ", isolated: the gateway address only, nothing routed"
                    } else {
                        ""
                    }
                );
            }
        }
        NetworkCmd::Down { name, host } => {
            let v = conn.client()?.host_network(&name).await?;
            let h = Host::new(&host, &name)?;
            for s in &v.subnets {
                h.down(s)?;
                println!("{}/{}: bridge {} removed", v.name, s.name, s.bridge);
            }
            // Empty once every subnet's files are gone; a leftover file keeps it, harmlessly.
            let _ = std::fs::remove_dir(&h.run_dir);
        }
    }
    Ok(0)
}

fn print_view(v: &HostNetworkView) {
    println!(
        "network {}{}",
        v.name,
        if v.isolated { " (isolated)" } else { "" }
    );
    for s in &v.subnets {
        println!(
            "  subnet {} {} gateway {} bridge {}",
            s.name, s.prefix, s.gateway, s.bridge
        );
        for r in &s.reservations {
            println!(
                "    {} -> {}  NIC {} of VM {} (failover {})",
                r.mac, r.ip, r.nic_index, r.vm, r.failover_id
            );
        }
    }
}

fn prefix_len(prefix: &str) -> Result<u8> {
    let cidr: crate::failover::network::Ipv4Cidr = prefix
        .parse()
        .with_context(|| format!("the server sent a subnet prefix {prefix:?}"))?;
    Ok(cidr.prefix_len())
}

/// Runs the host's tools (ip, dnsmasq, sh, kill), inside the namespace when one is given.
struct Host {
    netns: Option<String>,
    run_dir: PathBuf,
}

impl Host {
    fn new(args: &HostArgs, network: &str) -> Result<Host> {
        let run_dir = match &args.run_dir {
            Some(d) => d.clone(),
            None => {
                let mut d = PathBuf::from("/run/drvault/network");
                if let Some(ns) = &args.netns {
                    d.push(ns);
                }
                d.join(network)
            }
        };
        Ok(Host {
            netns: args.netns.clone(),
            run_dir,
        })
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// Runs `program args`; an error says what failed and what the tool printed.
    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let out = self.command(program).args(args).output().with_context(|| {
            format!("cannot run {program} (apt-get install iproute2 dnsmasq-base)")
        })?;
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                if self.netns.is_some() {
                    ""
                } else {
                    " (bridges and DHCP servers need root)"
                }
            );
        }
        Ok(())
    }

    fn link_exists(&self, dev: &str) -> bool {
        self.command("ip")
            .args(["link", "show", "dev", dev])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The subnet's hosts, pid, lease and log files.
    fn files(&self, s: &HostSubnetView) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let f = |what: &str| self.run_dir.join(format!("{what}-{}", s.host_network));
        (
            f("dhcp-hosts.conf"),
            f("dnsmasq.pid"),
            f("dnsmasq.leases"),
            f("dnsmasq.log"),
        )
    }

    fn up(&self, v: &HostNetworkView, s: &HostSubnetView) -> Result<()> {
        let len = prefix_len(&s.prefix)?;
        if !self.link_exists(&s.bridge) {
            self.run("ip", &["link", "add", "name", &s.bridge, "type", "bridge"])?;
        }
        self.run(
            "ip",
            &[
                "addr",
                "replace",
                &format!("{}/{len}", s.gateway),
                "dev",
                &s.bridge,
            ],
        )?;
        self.run("ip", &["link", "set", "dev", &s.bridge, "up"])?;
        std::fs::create_dir_all(&self.run_dir)
            .with_context(|| format!("creating {}", self.run_dir.display()))?;
        if v.isolated {
            self.isolate(s)?;
        }
        let (hosts, pid, leases, log) = self.files(s);
        let mut text = String::new();
        for r in &s.reservations {
            text.push_str(&r.mac);
            text.push(',');
            text.push_str(&r.ip);
            if let Some(n) = &r.hostname {
                text.push(',');
                text.push_str(n);
            }
            text.push('\n');
        }
        write_readable(&hosts, &text)?;
        if let Some(p) = self.running_dnsmasq(&pid) {
            // dnsmasq reads --dhcp-hostsfile again on SIGHUP.
            self.run("kill", &["-HUP", &p.to_string()])?;
            return Ok(());
        }
        let cidr: crate::failover::network::Ipv4Cidr = s.prefix.parse()?;
        let mut args = vec![
            "--conf-file=/dev/null".to_string(),
            // DHCP only: no DNS server, so nothing else on the host listens on port 53.
            "--port=0".into(),
            format!("--interface={}", s.bridge),
            "--bind-interfaces".into(),
            "--except-interface=lo".into(),
            // `static`: only reserved MACs get an address, so no lease can take an address
            // drvault allocates later.
            format!("--dhcp-range={},static,{}", cidr.network(), cidr.netmask()),
            format!("--dhcp-hostsfile={}", hosts.display()),
            format!("--dhcp-leasefile={}", leases.display()),
            format!("--pid-file={}", pid.display()),
            format!("--log-facility={}", log.display()),
            "--log-dhcp".into(),
            "--dhcp-authoritative".into(),
            format!("--dhcp-option=option:router,{}", s.gateway),
        ];
        if !v.dns.is_empty() {
            args.push(format!(
                "--dhcp-option=option:dns-server,{}",
                v.dns.join(",")
            ));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // dnsmasq returns once its daemon is set up, or fails with the reason.
        self.run("dnsmasq", &args)
    }

    /// An nftables table of the bridge's own: its VMs reach the gateway address (ping, DHCP)
    /// and nothing else of the host, and nothing is routed to or from the bridge, whatever the
    /// host's forwarding setting (a host that routes for other networks stays one).
    fn isolate(&self, s: &HostSubnetView) -> Result<()> {
        let table = nft_table(s);
        let br = &s.bridge;
        let rules = format!(
            "table inet {table} {{}}\n\
             delete table inet {table}\n\
             table inet {table} {{\n\
             \x20 chain input {{\n\
             \x20   type filter hook input priority 0; policy accept;\n\
             \x20   iifname \"{br}\" ip daddr != {{ {gw}, 255.255.255.255 }} drop\n\
             \x20 }}\n\
             \x20 chain forward {{\n\
             \x20   type filter hook forward priority 0; policy accept;\n\
             \x20   iifname \"{br}\" drop\n\
             \x20   oifname \"{br}\" drop\n\
             \x20 }}\n\
             }}\n",
            gw = s.gateway
        );
        let file = self.run_dir.join(format!("nft-{}.conf", s.host_network));
        std::fs::write(&file, rules).with_context(|| format!("writing {}", file.display()))?;
        let file = file.to_string_lossy().into_owned();
        // The first two lines make the load replace an older table of the same name at once.
        self.run("nft", &["-f", &file])
            .context("isolating the network needs nftables (apt-get install nftables)")
    }

    fn down(&self, s: &HostSubnetView) -> Result<()> {
        let (hosts, pid, leases, log) = self.files(s);
        if let Some(p) = self.running_dnsmasq(&pid) {
            self.run("kill", &["-TERM", &p.to_string()])?;
        }
        if self.link_exists(&s.bridge) {
            self.run("ip", &["link", "delete", "dev", &s.bridge])?;
        }
        let table = nft_table(s);
        if self
            .command("nft")
            .args(["list", "table", "inet", &table])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            self.run("nft", &["delete", "table", "inet", &table])?;
        }
        let nft_file = self.run_dir.join(format!("nft-{}.conf", s.host_network));
        for f in [hosts, pid, leases, log, nft_file] {
            let _ = std::fs::remove_file(f);
        }
        Ok(())
    }

    /// The pid in `pid_file` when that process is a dnsmasq still running.
    fn running_dnsmasq(&self, pid_file: &Path) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "dnsmasq").then_some(pid)
    }
}

/// The nftables table isolating a bridge.
fn nft_table(s: &HostSubnetView) -> String {
    format!("drvault_{}", s.bridge)
}

/// Written so dnsmasq can read it after dropping root.
fn write_readable(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(())
}
