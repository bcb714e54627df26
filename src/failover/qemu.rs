//! A plain qemu command line for a VM definition.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::definition::{DiskBus, Firmware, NicModel, VmDefinition, OVMF_CODE};
use super::libvirt::dns_label;
use super::network::Ipv4Cidr;
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
    def.validate()?;
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
    let mut argv: Vec<String> = vec![
        "qemu-system-x86_64".into(),
        "-name".into(),
        def.name.clone(),
    ];
    let machine = match def.firmware {
        Firmware::Bios => "pc",
        Firmware::Uefi => "q35",
    };
    // KVM when the host has it, else software emulation (qemu tries the accelerators in order).
    argv.extend(["-machine", machine, "-accel", "kvm", "-accel", "tcg"].map(String::from));
    argv.extend([
        "-m".into(),
        format!("{}M", def.memory_mib),
        "-smp".into(),
        def.cpus.to_string(),
    ]);
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
    for n in &def.nics {
        let model = match n.model {
            NicModel::E1000 => "e1000",
            NicModel::Virtio => "virtio-net-pci",
        };
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
    argv.push("-nographic".into());
    Ok(argv)
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

/// `qemu.sh`: a shell script that runs `argv`.
pub fn qemu_script(argv: &[String]) -> String {
    format!(
        "#!/bin/sh\nexec {}\n",
        argv.iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    )
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
    fn qemu_script_quotes_what_the_shell_would_split() {
        let argv: Vec<String> = [
            "qemu-system-x86_64",
            "-drive",
            "file=/a b/it's.vhd",
            "-m",
            "512M",
        ]
        .map(String::from)
        .into();
        let script = qemu_script(&argv);
        assert_eq!(
            script,
            "#!/bin/sh\nexec qemu-system-x86_64 -drive 'file=/a b/it'\\''s.vhd' -m 512M\n"
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(script.replace("exec qemu-system-x86_64", "printf '%s\\n'"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "-drive\nfile=/a b/it's.vhd\n-m\n512M\n"
        );
    }
}
