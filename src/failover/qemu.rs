//! A plain qemu command line for a VM definition.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::definition::{DiskBus, Firmware, NicModel, VmDefinition, OVMF_CODE};
use super::libvirt::dns_label;
use super::network::{bridge_name, Ipv4Cidr};
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// qemu
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// A host port forwarded to a guest port of a NIC that asked for a public address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostForward {
    pub nic_index: u32,
    pub proto: Proto,
    /// The host address to listen on (0.0.0.0 for all).
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
}

/// qemu splits option values at commas; a literal comma is written twice.
fn qemu_value(s: &str) -> String {
    s.replace(',', ",,")
}

/// A qemu-system-x86_64 argv (program first) that boots the definition, looking for UEFI
/// firmware at [`OVMF_CODE`].
pub fn qemu_command(def: &VmDefinition, host_forwards: &[HostForward]) -> Result<Vec<String>> {
    let ovmf = Path::new(OVMF_CODE);
    qemu_command_with(def, host_forwards, ovmf.exists().then_some(ovmf))
}

/// [`qemu_command`] with the UEFI firmware given (`None`: not installed).
pub fn qemu_command_with(
    def: &VmDefinition,
    host_forwards: &[HostForward],
    ovmf_code: Option<&Path>,
) -> Result<Vec<String>> {
    let (machine, hardware) = machine_and_disks(def, ovmf_code)?;
    let nics = user_nics(def, host_forwards)?;
    let mut argv: Vec<String> = vec![
        "qemu-system-x86_64".into(),
        "-name".into(),
        def.name.clone(),
    ];
    // KVM when the host has it, else software emulation (qemu tries the accelerators in order).
    argv.extend(["-machine", machine, "-accel", "kvm", "-accel", "tcg"].map(String::from));
    argv.extend(hardware);
    argv.extend(nics);
    argv.push("-nographic".into());
    Ok(argv)
}

/// The machine type, and the memory, CPU, firmware and disk arguments (everything but the
/// accelerator and the NICs).
fn machine_and_disks(
    def: &VmDefinition,
    ovmf_code: Option<&Path>,
) -> Result<(&'static str, Vec<String>)> {
    def.validate()?;
    let machine = match def.firmware {
        Firmware::Bios => "pc",
        Firmware::Uefi => "q35",
    };
    let mut argv: Vec<String> = vec![
        "-m".into(),
        format!("{}M", def.memory_mib),
        "-smp".into(),
        def.cpus.to_string(),
    ];
    if def.firmware == Firmware::Uefi {
        let Some(code) = ovmf_code else {
            return Err(Error::conflict(
                "uefi_firmware_missing",
                format!("VM {} is generation 2 (UEFI): UEFI firmware (OVMF_CODE.fd) not found at {OVMF_CODE}; apt-get install ovmf", def.name),
            ));
        };
        let code = code
            .to_str()
            .ok_or_else(|| Error::invalid("invalid_firmware_path", "the OVMF path is not UTF-8"))?;
        argv.extend([
            "-drive".into(),
            format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                qemu_value(code)
            ),
        ]);
    }
    let mut ide = 0usize;
    for (i, d) in def.disks.iter().enumerate() {
        argv.extend([
            "-drive".into(),
            format!("if=none,id=disk{i},format=vpc,file={}", qemu_value(&d.path)),
        ]);
        let device = match d.bus {
            DiskBus::Ide => {
                ide += 1;
                format!(
                    "ide-hd,drive=disk{i},bus=ide.{},unit={}",
                    (ide - 1) / 2,
                    (ide - 1) % 2
                )
            }
            DiskBus::Virtio => format!("virtio-blk-pci,drive=disk{i}"),
        };
        argv.extend([
            "-device".into(),
            format!("{device},bootindex={i},serial={}", qemu_value(&d.id)),
        ]);
    }
    Ok((machine, argv))
}

fn nic_model(model: NicModel) -> &'static str {
    match model {
        NicModel::E1000 => "e1000",
        NicModel::Virtio => "virtio-net-pci",
    }
}

/// One private user-mode (slirp) network per NIC with the target subnet's addresses: needs
/// neither root nor bridges, but NICs cannot reach each other.
fn user_nics(def: &VmDefinition, host_forwards: &[HostForward]) -> Result<Vec<String>> {
    for f in host_forwards {
        let nic = def.nics.iter().find(|n| n.index == f.nic_index);
        if !nic.is_some_and(|n| n.public_ip) {
            return Err(Error::invalid(
                "invalid_forward",
                format!(
                    "port forward to NIC {} of VM {}: that NIC did not ask for a public address",
                    f.nic_index, def.name
                ),
            ));
        }
        if f.host_port == 0 || f.guest_port == 0 {
            return Err(Error::invalid(
                "invalid_forward",
                format!("port forward to NIC {}: port 0", f.nic_index),
            ));
        }
    }
    let mut argv = Vec::new();
    for n in &def.nics {
        let model = nic_model(n.model);
        let net = Ipv4Cidr::containing(n.ip, n.prefix_len).map_err(|e| {
            Error::invalid("invalid_vm_definition", format!("NIC {}: {e}", n.index))
        })?;
        let mut opt = format!(
            "user,id=nic{},mac={},model={model},net={net},host={},dhcpstart={}",
            n.index,
            n.mac.to_ascii_lowercase(),
            n.gateway,
            n.ip
        );
        if n.index == 0 && dns_label(&def.name) {
            let _ = write!(opt, ",hostname={}", def.name);
        }
        if n.isolated {
            // No route out, as on the libvirt network; forwards in still work.
            opt.push_str(",restrict=on");
        }
        for f in host_forwards.iter().filter(|f| f.nic_index == n.index) {
            let proto = match f.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            let _ = write!(
                opt,
                ",hostfwd={proto}:{}:{}-{}:{}",
                f.host_addr, f.host_port, n.ip, f.guest_port
            );
        }
        argv.extend(["-nic".into(), opt]);
    }
    if def.nics.is_empty() {
        argv.extend(["-nic".into(), "none".into()]);
    }
    Ok(argv)
}

/// Tap device names are at most 15 bytes: `dvt`, the shell's PID (at most 7 digits) and `n`
/// leave 4 digits for the NIC's position. Hyper-V VMs have at most 12 NICs.
const MAX_BRIDGED_NICS: usize = 100;

/// `qemu.sh`: boots the definition with each NIC on a tap device attached to the Linux bridge
/// of its target subnet (`drvault network up` creates them; an environment variable per NIC
/// names another), or with `DRVAULT_NET=user` on qemu's user-mode network instead. The script
/// explains its environment in its header; arguments are appended to qemu's command line.
pub fn qemu_script_for(def: &VmDefinition, host_forwards: &[HostForward]) -> Result<String> {
    let ovmf = Path::new(OVMF_CODE);
    qemu_script_with(def, host_forwards, ovmf.exists().then_some(ovmf))
}

/// [`qemu_script_for`] with the UEFI firmware given (`None`: not installed).
pub fn qemu_script_with(
    def: &VmDefinition,
    host_forwards: &[HostForward],
    ovmf_code: Option<&Path>,
) -> Result<String> {
    let (machine, hardware) = machine_and_disks(def, ovmf_code)?;
    let user = user_nics(def, host_forwards)?;
    if def.nics.len() > MAX_BRIDGED_NICS {
        return Err(Error::invalid(
            "invalid_vm_definition",
            format!(
                "VM {} has {} NICs; qemu.sh supports at most {MAX_BRIDGED_NICS}",
                def.name,
                def.nics.len()
            ),
        ));
    }
    let head = |argv: &[String]| {
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let common = format!(
        "qemu-system-x86_64 -name {} -machine \"{machine},accel=$accel\" {}",
        shell_quote(&def.name),
        head(&hardware)
    );
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/sh");
    let _ = writeln!(
        s,
        "# VM {} of drvault {} failover {} (recovery point {}, {}), generated by drvault.",
        def.name,
        kind_word(def),
        def.failover.id,
        def.failover.point_id,
        def.failover.time
    );
    s.push_str(
        "#\n\
         # Each NIC is a tap device on the Linux bridge of its target subnet: `drvault network up\n\
         # NETWORK` creates that bridge with the subnet's gateway address and a DHCP server holding\n\
         # the failover's reservations (dhcp-hosts-*.conf beside this file), or set the NIC's\n\
         # variable to a bridge of your own (an existing bridge, one on a VLAN):\n",
    );
    for n in &def.nics {
        let _ = writeln!(
            s,
            "#   DRVAULT_BRIDGE_{}={}  NIC {} {} ({}) on {}/{}: {}/{} gateway {}",
            n.index,
            bridge_name(&n.network, &n.subnet),
            n.index,
            n.mac.to_ascii_lowercase(),
            nic_model(n.model),
            n.network,
            n.subnet,
            n.ip,
            n.prefix_len,
            n.gateway
        );
    }
    s.push_str(
        "# Tap devices need root (CAP_NET_ADMIN); they are removed when qemu exits.\n\
         # DRVAULT_NET=user: qemu's user-mode network instead, one private network per NIC with\n\
         #   the same addresses (no root, no bridges; NICs cannot reach each other or the host's\n\
         #   networks; a NIC that asked for a public address gets host port forwards).\n\
         # DRVAULT_ACCEL: the accelerators qemu tries, in order (default kvm:tcg).\n\
         # Arguments are appended to qemu's command line (e.g. -display none -serial file:log).\n\
         set -eu\n\
         accel=\"${DRVAULT_ACCEL:-kvm:tcg}\"\n\
         case \"${DRVAULT_NET:-bridge}\" in\n",
    );
    let _ = writeln!(
        s,
        "user) exec {common} {} -nographic \"$@\" ;;",
        head(&user)
    );
    s.push_str(
        "bridge) ;;\n\
         *) echo \"qemu.sh: DRVAULT_NET must be bridge or user, not $DRVAULT_NET\" >&2; exit 2 ;;\n\
         esac\n\
         taps=\n\
         cleanup() { for t in $taps; do ip link delete \"$t\" 2>/dev/null || true; done; }\n\
         trap cleanup EXIT\n\
         trap 'exit 129' HUP\n\
         trap 'exit 130' INT\n\
         trap 'exit 143' TERM\n\
         # attach POSITION BRIDGE NIC: a new tap device on BRIDGE, named in $tap.\n\
         attach() {\n\
         \x20   if ! ip link show dev \"$2\" >/dev/null 2>&1; then\n\
         \x20       echo \"qemu.sh: bridge $2 of NIC $3 does not exist: run 'drvault network up' for its network, or set DRVAULT_BRIDGE_$3\" >&2\n\
         \x20       exit 1\n\
         \x20   fi\n\
         \x20   tap=\"dvt$$n$1\"\n\
         \x20   ip tuntap add dev \"$tap\" mode tap\n\
         \x20   taps=\"$taps $tap\"\n\
         \x20   ip link set dev \"$tap\" master \"$2\" up\n\
         }\n",
    );
    let mut nic_args = String::new();
    for (pos, n) in def.nics.iter().enumerate() {
        let _ = writeln!(
            s,
            "attach {pos} \"${{DRVAULT_BRIDGE_{}:-{}}}\" {}\ntap{pos}=$tap",
            n.index,
            bridge_name(&n.network, &n.subnet),
            n.index
        );
        let _ = write!(
            nic_args,
            " -netdev \"tap,id=nic{},ifname=$tap{pos},script=no,downscript=no\" -device {}",
            n.index,
            shell_quote(&format!(
                "{},netdev=nic{},mac={}",
                nic_model(n.model),
                n.index,
                n.mac.to_ascii_lowercase()
            ))
        );
    }
    if def.nics.is_empty() {
        nic_args.push_str(" -nic none");
    }
    // Not exec: the EXIT trap removes the tap devices once qemu is gone.
    let _ = writeln!(s, "{common}{nic_args} -nographic \"$@\"");
    Ok(s)
}

fn kind_word(def: &VmDefinition) -> &'static str {
    match def.failover.kind {
        super::definition::FailoverKind::Test => "test",
        super::definition::FailoverKind::Planned => "planned",
        super::definition::FailoverKind::Unplanned => "unplanned",
    }
}

/// Host port for a NIC's public address: 20000 + the low 15 bits of its address, so every
/// address of a /17 gets its own port; forwarded to the guest's SSH port (22).
pub fn public_forwards(def: &VmDefinition) -> Vec<HostForward> {
    def.nics
        .iter()
        .filter(|n| n.public_ip)
        .map(|n| HostForward {
            nic_index: n.index,
            proto: Proto::Tcp,
            host_addr: std::net::Ipv4Addr::UNSPECIFIED,
            host_port: 20000 + (u32::from(n.ip) & 0x7fff) as u16,
            guest_port: 22,
        })
        .collect()
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./=,:".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::definition::tests::definition;
    use crate::failover::definition::FailoverKind;
    use std::process::{Command, Stdio};

    fn forward(nic_index: u32, host_port: u16) -> HostForward {
        HostForward {
            nic_index,
            proto: Proto::Tcp,
            host_addr: Ipv4Addr::LOCALHOST,
            host_port,
            guest_port: 22,
        }
    }

    #[test]
    fn qemu_argv_for_gen1_and_gen2() {
        let (def, _) = definition(1, 5, FailoverKind::Planned, "/v/a,b");
        let argv = qemu_command_with(&def, &[forward(0, 2222)], None).unwrap();
        let joined = argv.join(" ");
        assert_eq!(argv[0], "qemu-system-x86_64");
        assert!(
            joined.contains("-machine pc ") && joined.contains("-m 1024M -smp 2"),
            "{joined}"
        );
        assert!(
            joined.contains("-drive if=none,id=disk0,format=vpc,file=/v/a,,b/disk0.vhd"),
            "{joined}"
        );
        assert!(
            joined.contains("-device ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=0,serial=disk0"),
            "{joined}"
        );
        assert!(
            joined.contains("-device ide-hd,drive=disk3,bus=ide.1,unit=1,bootindex=3"),
            "{joined}"
        );
        assert!(
            joined.contains("-device virtio-blk-pci,drive=disk4,bootindex=4"),
            "{joined}"
        );
        assert!(joined.contains(
            "-nic user,id=nic0,mac=00:15:5d:01:02:03,model=e1000,net=10.20.1.0/24,host=10.20.1.1,dhcpstart=10.20.1.50,hostname=web01,hostfwd=tcp:127.0.0.1:2222-10.20.1.50:22"
        ), "{joined}");
        assert!(joined.contains("-nic user,id=nic1,mac=00:15:5d:01:02:04,model=e1000,net=10.20.2.0/24,host=10.20.2.100,dhcpstart=10.20.2.4 "), "{joined}");
        assert!(
            !joined.contains("pflash") && argv.last().map(String::as_str) == Some("-nographic")
        );

        let (def, _) = definition(2, 2, FailoverKind::Test, "/v");
        let e = qemu_command_with(&def, &[], None).unwrap_err();
        assert_eq!(e.code(), "uefi_firmware_missing");
        let argv = qemu_command_with(&def, &[], Some(Path::new(OVMF_CODE))).unwrap();
        let joined = argv.join(" ");
        assert!(
            joined.contains("-machine q35")
                && joined.contains(&format!(
                    "-drive if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
                )),
            "{joined}"
        );
        assert!(
            joined.contains("-device virtio-blk-pci,drive=disk0,bootindex=0")
                && joined.contains("model=virtio-net-pci"),
            "{joined}"
        );
        assert!(
            joined.contains(",restrict=on"),
            "drill network is isolated: {joined}"
        );
    }

    #[test]
    fn qemu_refuses_forwards_without_a_public_address() {
        let (def, _) = definition(1, 1, FailoverKind::Planned, "/v");
        for f in [forward(1, 2222), forward(7, 2222), forward(0, 0)] {
            let e = qemu_command_with(&def, std::slice::from_ref(&f), None).unwrap_err();
            assert_eq!(e.code(), "invalid_forward", "{f:?}");
        }
    }

    /// qemu itself accepts the argv: it opens the disks, parses every -nic and -device, then
    /// stops before running guest code (`-S`) and quits on the serial mux's C-a x.
    #[test]
    fn qemu_accepts_the_generated_argv() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let (def, _) = definition(1, 5, FailoverKind::Planned, d);
        for disk in &def.disks {
            let out = Command::new("qemu-img")
                .args([
                    "create",
                    "-q",
                    "-f",
                    "vpc",
                    "-o",
                    "subformat=fixed,force_size=on",
                    &disk.path,
                    "10M",
                ])
                .output()
                .unwrap_or_else(|e| {
                    panic!("qemu-img cannot run ({e}): run .ci/install-boot-deps.sh")
                });
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A port free a moment ago; qemu fails loudly if someone took it since.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let argv = qemu_command_with(&def, &[forward(0, port)], None).unwrap();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .args(["-S", "-accel", "tcg"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{} cannot run ({e}): run .ci/install-boot-deps.sh", argv[0])
            });
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(b"\x01x");
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "qemu refused {argv:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn shell_quote_keeps_what_the_shell_would_split_whole() {
        let args = ["-drive", "file=/a b/it's.vhd", "-m", "512M"];
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        assert_eq!(quoted.join(" "), "-drive 'file=/a b/it'\\''s.vhd' -m 512M");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\n' {}", quoted.join(" ")))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "-drive\nfile=/a b/it's.vhd\n-m\n512M\n"
        );
    }

    /// Runs a generated qemu.sh with stand-ins for `ip` and qemu on PATH: what it asks of the
    /// host, and qemu's argv, one argument a line.
    fn run_script(
        script: &str,
        env: &[(&str, &str)],
        bridges: &str,
    ) -> (i32, String, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let log = dir.path().join("ip.log");
        let argv = dir.path().join("argv");
        let stub = |name: &str, body: String| {
            let p = bin.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        // `ip link show dev X` succeeds only for the bridges given.
        stub(
            "ip",
            format!(
                "echo \"$*\" >>{}\nif [ \"$1 $2\" = 'link show' ]; then case \" {bridges} \" in *\" $4 \"*) exit 0 ;; *) exit 1 ;; esac; fi\n",
                log.display()
            ),
        );
        stub(
            "qemu-system-x86_64",
            format!("printf '%s\\n' \"$@\" >{}\n", argv.display()),
        );
        let sh = dir.path().join("qemu.sh");
        std::fs::write(&sh, script).unwrap();
        let out = Command::new("sh")
            .arg(&sh)
            .args(["-display", "none"])
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(&argv).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn qemu_sh_puts_each_nic_on_its_subnets_bridge_and_removes_its_taps() {
        let (def, _) = definition(1, 1, FailoverKind::Planned, "/v");
        let script = qemu_script_with(&def, &public_forwards(&def), None).unwrap();
        let app = bridge_name("recovery-vnet", "app");
        let db = bridge_name("recovery-vnet", "db");
        assert_eq!(app.len(), 12);
        assert_ne!(app, db);
        assert!(
            script.contains(&format!("DRVAULT_BRIDGE_0={app}  NIC 0 00:15:5d:01:02:03 (e1000) on recovery-vnet/app: 10.20.1.50/24 gateway 10.20.1.1")),
            "{script}"
        );

        let (rc, ip, argv, err) = run_script(&script, &[], &format!("{app} {db}"));
        assert_eq!(rc, 0, "{err}");
        let taps: Vec<&str> = ip
            .lines()
            .filter_map(|l| l.strip_prefix("tuntap add dev "))
            .map(|l| l.trim_end_matches(" mode tap"))
            .collect();
        assert_eq!(taps.len(), 2, "{ip}");
        assert!(
            ip.contains(&format!("link set dev {} master {app} up", taps[0])),
            "{ip}"
        );
        assert!(
            ip.contains(&format!("link set dev {} master {db} up", taps[1])),
            "{ip}"
        );
        for t in &taps {
            assert!(
                ip.contains(&format!("link delete {t}")),
                "taps removed on exit: {ip}"
            );
        }
        let argv: Vec<&str> = argv.lines().collect();
        let joined = argv.join(" ");
        assert!(
            joined.contains("-machine pc,accel=kvm:tcg -m 1024M -smp 2"),
            "{joined}"
        );
        assert!(joined.contains(&format!(
            "-netdev tap,id=nic0,ifname={},script=no,downscript=no -device e1000,netdev=nic0,mac=00:15:5d:01:02:03",
            taps[0]
        )), "{joined}");
        assert!(joined.contains(&format!(
            "-netdev tap,id=nic1,ifname={},script=no,downscript=no -device e1000,netdev=nic1,mac=00:15:5d:01:02:04",
            taps[1]
        )), "{joined}");
        assert!(
            joined.ends_with("-nographic -display none"),
            "arguments appended: {joined}"
        );

        // A bridge of one's own, and another accelerator.
        let (rc, ip, argv, err) = run_script(
            &script,
            &[("DRVAULT_BRIDGE_1", "br-site"), ("DRVAULT_ACCEL", "tcg")],
            &format!("{app} br-site"),
        );
        assert_eq!(rc, 0, "{err}");
        assert!(ip.contains(" master br-site up"), "{ip}");
        assert!(argv.contains("pc,accel=tcg\n"), "{argv}");

        // A missing bridge: nothing started, and the message says what to run.
        let (rc, _, argv, err) = run_script(&script, &[], &app);
        assert_eq!(rc, 1);
        assert!(argv.is_empty());
        assert!(
            err.contains(&format!("bridge {db} of NIC 1 does not exist"))
                && err.contains("drvault network up"),
            "{err}"
        );

        // User-mode networking: no taps, the slirp NICs of qemu_command.
        let (rc, ip, argv, err) = run_script(&script, &[("DRVAULT_NET", "user")], "");
        assert_eq!(rc, 0, "{err}");
        assert!(ip.is_empty(), "{ip}");
        assert!(argv.contains("user,id=nic0,mac=00:15:5d:01:02:03,model=e1000,net=10.20.1.0/24,host=10.20.1.1,dhcpstart=10.20.1.50,hostname=web01,hostfwd=tcp:0.0.0.0:"), "{argv}");
    }
}
