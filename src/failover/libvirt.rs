//! libvirt renderings of a VM definition: the domain, and one network per target subnet.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::address::Allocations;
use super::address::RESERVED_AT_START;
use super::definition::{DiskBus, FailoverKind, Firmware, NicModel, VmDefinition};
use super::network::{bridge_name, host_network_name, NetworkConfig, Subnet, TargetNetwork};

// ---------------------------------------------------------------------------------------------
// libvirt XML
// ---------------------------------------------------------------------------------------------

/// Escapes text for both element content and single- or double-quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// `sda`-style device names: a..z, then aa..zz.
fn dev_name(prefix: &str, index: usize) -> String {
    let letter = |i: usize| char::from(b'a' + (i % 26) as u8);
    if index < 26 {
        format!("{prefix}{}", letter(index))
    } else {
        format!("{prefix}{}{}", letter(index / 26 - 1), letter(index))
    }
}

/// The libvirt domain (KVM) for a definition.
pub fn libvirt_domain_xml(def: &VmDefinition) -> String {
    let mut x = String::new();
    let machine = match def.firmware {
        Firmware::Bios => "pc",
        Firmware::Uefi => "q35",
    };
    let _ = writeln!(x, "<domain type='kvm'>");
    let _ = writeln!(x, "  <name>{}</name>", esc(&def.name));
    let _ = writeln!(
        x,
        "  <description>drvault {} failover {} of recovery point {} at {}</description>",
        esc(kind_name(def.failover.kind)),
        esc(&def.failover.id),
        esc(&def.failover.point_id),
        esc(&def.failover.time)
    );
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", def.memory_mib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", def.cpus);
    match def.firmware {
        Firmware::Bios => x.push_str("  <os>\n"),
        Firmware::Uefi => x.push_str("  <os firmware='efi'>\n"),
    }
    let _ = writeln!(x, "    <type arch='x86_64' machine='{machine}'>hvm</type>");
    x.push_str("  </os>\n  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
    x.push_str("  <clock offset='utc'/>\n  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    let (mut ide, mut virtio) = (0usize, 0usize);
    for (i, d) in def.disks.iter().enumerate() {
        let (dev, bus) = match d.bus {
            DiskBus::Ide => {
                ide += 1;
                (dev_name("hd", ide - 1), "ide")
            }
            DiskBus::Virtio => {
                virtio += 1;
                (dev_name("vd", virtio - 1), "virtio")
            }
        };
        x.push_str(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='vpc'/>\n",
        );
        let _ = writeln!(x, "      <source file='{}'/>", esc(&d.path));
        let _ = writeln!(x, "      <target dev='{dev}' bus='{bus}'/>");
        let _ = writeln!(x, "      <serial>{}</serial>", esc(&d.id));
        let _ = writeln!(x, "      <boot order='{}'/>", i + 1);
        x.push_str("    </disk>\n");
    }
    for n in &def.nics {
        x.push_str("    <interface type='network'>\n");
        let _ = writeln!(
            x,
            "      <mac address='{}'/>",
            esc(&n.mac.to_ascii_lowercase())
        );
        let _ = writeln!(x, "      <source network='{}'/>", esc(&n.host_network));
        let model = match n.model {
            NicModel::E1000 => "e1000",
            NicModel::Virtio => "virtio",
        };
        let _ = writeln!(x, "      <model type='{model}'/>");
        x.push_str("    </interface>\n");
    }
    x.push_str("    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n");
    x.push_str(
        "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
    );
    x.push_str("  </devices>\n</domain>\n");
    x
}

fn kind_name(k: FailoverKind) -> &'static str {
    match k {
        FailoverKind::Test => "test",
        FailoverKind::Planned => "planned",
        FailoverKind::Unplanned => "unplanned",
    }
}

/// A static DHCP lease: this MAC always gets this address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: String,
    pub ip: Ipv4Addr,
    /// Host name handed out, when it is a plain DNS label.
    pub name: Option<String>,
}

/// A DNS label (letters, digits, inner hyphens): what dnsmasq accepts as a host name.
pub(super) fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Every allocation of a subnet as a DHCP host entry. A VM's name is the host name of its
/// first NIC when it is a DNS label and no other entry would carry the same name.
pub fn dhcp_hosts(
    allocations: &Allocations,
    network: &TargetNetwork,
    subnet: &Subnet,
) -> Vec<DhcpHost> {
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, a) in allocations.in_subnet(network, subnet) {
        if a.nic_index == 0 {
            *names.entry(a.vm.as_str()).or_default() += 1;
        }
    }
    allocations
        .in_subnet(network, subnet)
        .map(|(ip, a)| DhcpHost {
            mac: a.mac.clone(),
            ip,
            name: (a.nic_index == 0 && dns_label(&a.vm) && names.get(a.vm.as_str()) == Some(&1))
                .then(|| a.vm.clone()),
        })
        .collect()
}

/// Usable addresses of a subnet as inclusive ranges: Azure's reserved addresses cut off both
/// ends, the gateway may cut a hole. Computed, not iterated, so a /8 costs nothing.
fn dhcp_ranges(subnet: &Subnet) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let prefix = subnet.prefix();
    let (Some(lo), Some(hi)) = (
        prefix.nth(RESERVED_AT_START),
        prefix.size().checked_sub(2).and_then(|o| prefix.nth(o)),
    ) else {
        return Vec::new();
    };
    if lo > hi {
        return Vec::new();
    }
    let gw = subnet.gateway();
    if gw < lo || gw > hi {
        return vec![(lo, hi)];
    }
    let mut out = Vec::new();
    if gw > lo {
        out.push((lo, Ipv4Addr::from(u32::from(gw) - 1)));
    }
    if gw < hi {
        out.push((Ipv4Addr::from(u32::from(gw) + 1), hi));
    }
    out
}

/// The libvirt network for one target subnet (module doc). `hosts` are the static leases,
/// normally [`dhcp_hosts`] of the current allocations.
pub fn libvirt_network_xml(network: &TargetNetwork, subnet: &Subnet, hosts: &[DhcpHost]) -> String {
    let mut x = String::new();
    x.push_str("<network>\n");
    let _ = writeln!(
        x,
        "  <name>{}</name>",
        esc(&host_network_name(network.name(), subnet.name()))
    );
    if !network.isolated {
        x.push_str("  <forward mode='nat'/>\n");
    }
    // The same bridge `drvault network up` makes and qemu.sh attaches to.
    let _ = writeln!(
        x,
        "  <bridge name='{}' stp='on' delay='0'/>",
        bridge_name(network.name(), subnet.name())
    );
    let dns = network.dns_servers();
    if !dns.is_empty() {
        x.push_str("  <dns>\n");
        for d in dns {
            let _ = writeln!(x, "    <forwarder addr='{d}'/>");
        }
        x.push_str("  </dns>\n");
    }
    let _ = writeln!(
        x,
        "  <ip address='{}' prefix='{}'>",
        subnet.gateway(),
        subnet.prefix().prefix_len()
    );
    x.push_str("    <dhcp>\n");
    for (start, end) in dhcp_ranges(subnet) {
        let _ = writeln!(x, "      <range start='{start}' end='{end}'/>");
    }
    for h in hosts {
        let name = h
            .name
            .as_deref()
            .map(|n| format!(" name='{}'", esc(n)))
            .unwrap_or_default();
        let _ = writeln!(
            x,
            "      <host mac='{}'{name} ip='{}'/>",
            esc(&h.mac.to_ascii_lowercase()),
            h.ip
        );
    }
    x.push_str("    </dhcp>\n  </ip>\n</network>\n");
    x
}

/// The libvirt network of every target subnet `def`'s NICs attach to, once each, as (file
/// name, XML), with every current allocation of the subnet as a static lease.
pub fn network_files(
    def: &VmDefinition,
    networks: &NetworkConfig,
    allocations: &Allocations,
) -> Vec<(String, String)> {
    per_target_subnet(def, networks, |host_network, net, sub| {
        (
            format!("network-{host_network}.xml"),
            libvirt_network_xml(net, sub, &dhcp_hosts(allocations, net, sub)),
        )
    })
}

/// `file(host network, network, subnet)` for every target subnet `def`'s NICs attach to, once
/// each, in NIC order (subnets the config no longer names are left out).
fn per_target_subnet(
    def: &VmDefinition,
    networks: &NetworkConfig,
    file: impl Fn(&str, &TargetNetwork, &Subnet) -> (String, String),
) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for n in &def.nics {
        if !seen.insert(n.host_network.as_str()) {
            continue;
        }
        let Some((net, sub)) = networks
            .network(&n.network)
            .and_then(|net| net.subnet(&n.subnet).map(|sub| (net, sub)))
        else {
            continue;
        };
        out.push(file(&n.host_network, net, sub));
    }
    out
}

/// DHCP reservations in the format of dnsmasq's `--dhcp-hostsfile`: `mac,ip[,name]` a line.
pub fn dnsmasq_hosts(hosts: &[DhcpHost]) -> String {
    let mut out = String::new();
    for h in hosts {
        let _ = write!(out, "{},{}", h.mac.to_ascii_lowercase(), h.ip);
        if let Some(name) = &h.name {
            let _ = write!(out, ",{name}");
        }
        out.push('\n');
    }
    out
}

/// The reservations of every target subnet `def`'s NICs attach to, once each, as (file name,
/// dnsmasq hosts file): every current allocation of the subnet, so a DHCP server given the
/// file never hands an allocated address to another MAC.
pub fn dhcp_hosts_files(
    def: &VmDefinition,
    networks: &NetworkConfig,
    allocations: &Allocations,
) -> Vec<(String, String)> {
    per_target_subnet(def, networks, |host_network, net, sub| {
        (
            format!("dhcp-hosts-{host_network}.conf"),
            dnsmasq_hosts(&dhcp_hosts(allocations, net, sub)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::address::assign_nics;
    use crate::failover::definition::tests::{config, definition, spec};
    use crate::failover::definition::FailoverInfo;
    use std::process::Command;

    /// Runs virt-xml-validate on `xml` against `schema`; panics with its output on refusal.
    fn virt_xml_validate(xml: &str, schema: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{schema}.xml"));
        std::fs::write(&path, xml).unwrap();
        const INSTALL: &str =
            "apt-get install -y --no-install-recommends libvirt-clients libxml2-utils";
        let out = match Command::new("virt-xml-validate")
            .arg(&path)
            .arg(schema)
            .output()
        {
            Ok(o) => o,
            Err(e) => panic!("virt-xml-validate cannot run ({e}): install it with `{INSTALL}`"),
        };
        // The script runs xmllint, which libvirt-clients only recommends.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("xmllint: not found"),
            "virt-xml-validate needs xmllint: `{INSTALL}`"
        );
        assert!(
            out.status.success(),
            "virt-xml-validate refused the {schema} XML:\n{}{}\n{xml}",
            String::from_utf8_lossy(&out.stdout),
            stderr
        );
    }

    #[test]
    fn domain_xml_is_valid_libvirt_for_both_generations() {
        for (generation, n_disks, kind) in [
            (1, 1, FailoverKind::Planned),
            (1, 6, FailoverKind::Unplanned),
            (2, 3, FailoverKind::Planned),
            (2, 30, FailoverKind::Test),
        ] {
            let (def, _) = definition(generation, n_disks, kind, "/srv/drvault/fo 1 & <x>");
            let xml = libvirt_domain_xml(&def);
            virt_xml_validate(&xml, "domain");
            assert_eq!(
                xml.matches("<disk type='file' device='disk'>").count(),
                n_disks
            );
            assert_eq!(
                xml.matches("<driver name='qemu' type='vpc'/>").count(),
                n_disks
            );
            assert!(
                xml.contains("<source file='/srv/drvault/fo 1 &amp; &lt;x&gt;/disk0.vhd'/>"),
                "{xml}"
            );
            assert!(
                xml.contains("<boot order='1'/>")
                    && xml.contains("<mac address='00:15:5d:01:02:03'/>")
            );
            assert!(xml.contains("<source network='"));
            assert!(xml.contains("<console type='pty'>"));
            if generation == 1 {
                assert!(
                    xml.contains("<os>")
                        && xml.contains("machine='pc'")
                        && xml.contains("<target dev='hda' bus='ide'/>")
                );
                assert!(xml.contains("<model type='e1000'/>"));
                if n_disks > 4 {
                    assert!(
                        xml.contains("<target dev='hdd' bus='ide'/>")
                            && xml.contains("<target dev='vdb' bus='virtio'/>")
                    );
                }
            } else {
                assert!(
                    xml.contains("<os firmware='efi'>")
                        && xml.contains("machine='q35'")
                        && xml.contains("<target dev='vda' bus='virtio'/>")
                );
                assert!(!xml.contains("bus='ide'"));
                if n_disks > 26 {
                    assert!(xml.contains("<target dev='vdad' bus='virtio'/>"), "{xml}");
                }
            }
        }
    }

    #[test]
    fn network_xml_is_valid_libvirt() {
        let c = config();
        let mut allocs = Allocations::new();
        let fo = FailoverInfo::new(FailoverKind::Planned, "fo-1", "rp", 0);
        assign_nics(&c, &mut allocs, "web01", &spec(2, 1), &fo, &BTreeMap::new()).unwrap();
        let mut s2 = spec(2, 1);
        s2.nics[0].mac = "00:15:5D:0A:0B:0C".into();
        s2.nics[1].mac = "00:15:5D:0A:0B:0D".into();
        assign_nics(&c, &mut allocs, "db_01", &s2, &fo, &BTreeMap::new()).unwrap();

        let net = c.network("recovery-vnet").unwrap();
        let app = net.subnet("app").unwrap();
        let hosts = dhcp_hosts(&allocs, net, app);
        assert_eq!(hosts.len(), 2);
        let xml = libvirt_network_xml(net, app, &hosts);
        virt_xml_validate(&xml, "network");
        assert!(
            xml.contains("<name>recovery-vnet.app</name>") && xml.contains("<forward mode='nat'/>"),
            "{xml}"
        );
        assert!(
            xml.contains("<ip address='10.20.1.1' prefix='24'>"),
            "{xml}"
        );
        assert!(
            xml.contains("<range start='10.20.1.4' end='10.20.1.254'/>"),
            "{xml}"
        );
        assert!(xml.contains("<forwarder addr='10.20.0.10'/>"));
        assert!(
            xml.contains("<host mac='00:15:5d:01:02:03' name='web01' ip='10.20.1.50'/>"),
            "{xml}"
        );
        // db_01 is not a DNS label: a lease without a name.
        assert!(
            xml.contains("<host mac='00:15:5d:0a:0b:0c' ip='10.20.1.4'/>"),
            "{xml}"
        );

        // A gateway inside the usable range cuts the DHCP range in two.
        let db = net.subnet("db").unwrap();
        let xml = libvirt_network_xml(net, db, &dhcp_hosts(&allocs, net, db));
        virt_xml_validate(&xml, "network");
        assert!(
            xml.contains("<ip address='10.20.2.100' prefix='24'>"),
            "{xml}"
        );
        assert!(
            xml.contains("<range start='10.20.2.4' end='10.20.2.99'/>")
                && xml.contains("<range start='10.20.2.101' end='10.20.2.254'/>"),
            "{xml}"
        );

        // Isolated drill network: no forward element.
        let drill = c.network("drill-vnet").unwrap();
        let xml = libvirt_network_xml(drill, drill.subnet("app").unwrap(), &[]);
        virt_xml_validate(&xml, "network");
        assert!(!xml.contains("<forward"), "{xml}");
    }

    #[test]
    fn dhcp_ranges_handle_gateways_at_the_edges() {
        let r = |p: &str, gw: Option<&str>| {
            dhcp_ranges(&Subnet::new(
                "s",
                p.parse().unwrap(),
                gw.map(|g| g.parse().unwrap()),
            ))
            .into_iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect::<Vec<_>>()
        };
        assert_eq!(r("10.0.0.0/29", None), ["10.0.0.4-10.0.0.6"]);
        assert_eq!(r("10.0.0.0/29", Some("10.0.0.4")), ["10.0.0.5-10.0.0.6"]);
        assert_eq!(r("10.0.0.0/29", Some("10.0.0.6")), ["10.0.0.4-10.0.0.5"]);
        assert_eq!(
            r("10.0.0.0/8", Some("10.0.0.2")),
            ["10.0.0.4-10.255.255.254"]
        );
        assert!(r("10.0.0.0/30", None).is_empty());
        assert!(r("10.0.0.0/32", None).is_empty());
    }

    #[test]
    fn escaping_covers_markup() {
        assert_eq!(esc("a&b<c>'d\"e"), "a&amp;b&lt;c&gt;&apos;d&quot;e");
        assert_eq!(dev_name("vd", 0), "vda");
        assert_eq!(dev_name("vd", 25), "vdz");
        assert_eq!(dev_name("vd", 26), "vdaa");
        assert_eq!(dev_name("vd", 63), "vdbl");
    }

    #[test]
    fn network_files_cover_each_subnet_once_with_every_lease() {
        let (def, allocs) = definition(2, 1, FailoverKind::Planned, "/vault/fo-1");
        let files = network_files(&def, &config(), &allocs);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "network-recovery-vnet.app.xml",
                "network-recovery-vnet.db.xml"
            ]
        );
        for (n, (_, xml)) in def.nics.iter().zip(&files) {
            assert!(
                xml.contains(&format!("ip='{}'", n.ip)),
                "{} leases {}: {xml}",
                n.host_network,
                n.ip
            );
        }
        // Two NICs on one subnet give one network, holding both leases.
        let mut two = def.clone();
        let mut second = two.nics[0].clone();
        second.index = 5;
        second.mac = "00:15:5D:01:02:09".into();
        two.nics.truncate(1);
        two.nics.push(second);
        assert_eq!(network_files(&two, &config(), &allocs).len(), 1);
    }
}
