//! The VM definition a failover writes next to the disks (`vm.json`), and its renderings: a
//! libvirt domain, a libvirt network per target subnet, and a plain qemu command line.
//!
//! Hardware decisions (Hyper-V → KVM; the spec says only "generation 1 or 2"):
//! - Generation 1 is a BIOS PC: machine `pc` (i440FX, like Hyper-V's emulated gen-1 chipset),
//!   the first four disks on IDE (Hyper-V gen 1 boots from IDE, so every such guest has an IDE
//!   driver), further disks on virtio; NICs are e1000, which every guest OS drives.
//! - Generation 2 is UEFI: machine `q35`, every disk and NIC virtio. Hyper-V gen 2 has only
//!   synthetic devices, so no emulated controller is guaranteed to have a driver in the guest;
//!   virtio is KVM's paravirtual equivalent. Linux guests have it; Windows guests need the virtio
//!   drivers installed before protection (the usual preparation for a cross-hypervisor move).
//! - Disks boot in the order given (the agent's order, OS disk first): `<boot order>` in libvirt,
//!   `bootindex` in qemu. The bus is recorded per disk in vm.json so the choice is visible.
//! - UEFI in libvirt is `<os firmware='efi'>` (libvirt picks the firmware). For qemu,
//!   [`qemu_command`] uses [`OVMF_CODE`] (Debian's `ovmf` package) as read-only pflash and no
//!   variable store, so UEFI variables live in memory only; a gen-2 definition without that
//!   file is refused rather than started on SeaBIOS, where it could never boot.
//!
//! Network decisions:
//! - Each (network, subnet) is one libvirt network named [`host_network_name`]: the host's
//!   address on its bridge is the subnet's gateway, DHCP serves the subnet's usable addresses
//!   and pins every allocated NIC's MAC to its IPAM address (list every allocation of the
//!   subnet, see [`dhcp_hosts`], so the dynamic range never hands out an allocated address).
//!   The configured DNS servers become dnsmasq forwarders (libvirt has no plain way to hand
//!   them out by DHCP), so guests resolve through their gateway. `isolated` networks get no
//!   `<forward>`: no route out of the host.
//! - The qemu command line uses user-mode networking, one private slirp network per NIC with the
//!   target subnet's addresses (`net=`, `host=` gateway, `dhcpstart=` the NIC's IP), so the guest
//!   gets its failover address by DHCP; a requested public address becomes host port forwards.
//!   NICs there do not see each other: it is for booting and reaching one VM, libvirt is for
//!   networks of VMs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::address::{Allocations, NicRequest, Rule};
use super::network::{
    host_network_name, Ipv4Cidr, NetworkConfig, Subnet, TargetNetwork, RESERVED_AT_START,
};
use crate::error::{Error, Result};
use crate::protection::spec::{normalize_mac, VmSpec};
use crate::vault::registry::valid_name;

/// Version of the vm.json layout; bump on any incompatible change.
pub const DEFINITION_VERSION: u32 = 1;

/// Where Debian's `ovmf` package puts the UEFI firmware code.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";

/// IDE has two channels of two devices.
const MAX_IDE_DISKS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

impl Firmware {
    pub fn from_generation(generation: u8) -> Result<Firmware> {
        match generation {
            1 => Ok(Firmware::Bios),
            2 => Ok(Firmware::Uefi),
            g => Err(Error::invalid(
                "invalid_vm_spec",
                format!("generation {g}: must be 1 (BIOS) or 2 (UEFI)"),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    Ide,
    Virtio,
}

impl DiskBus {
    /// The bus of the disk at `index` in boot order (module doc).
    pub fn for_disk(firmware: Firmware, index: usize) -> DiskBus {
        match firmware {
            Firmware::Bios if index < MAX_IDE_DISKS => DiskBus::Ide,
            _ => DiskBus::Virtio,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    E1000,
    Virtio,
}

impl NicModel {
    pub fn for_firmware(firmware: Firmware) -> NicModel {
        match firmware {
            Firmware::Bios => NicModel::E1000,
            Firmware::Uefi => NicModel::Virtio,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverKind {
    Test,
    Planned,
    Unplanned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverInfo {
    pub kind: FailoverKind,
    pub id: String,
    pub point_id: String,
    pub time_unix: u64,
    /// `time_unix` in RFC 3339, for people reading vm.json.
    pub time: String,
}

impl FailoverInfo {
    pub fn new(kind: FailoverKind, id: &str, point_id: &str, time_unix: u64) -> FailoverInfo {
        FailoverInfo {
            kind,
            id: id.to_string(),
            point_id: point_id.to_string(),
            time_unix,
            time: crate::util::rfc3339(time_unix),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDefinition {
    pub id: String,
    /// Path of the fixed VHD as the hypervisor host sees it.
    pub path: String,
    pub bus: DiskBus,
    /// Size the guest sees (the VHD's), a whole number of MiB.
    pub virtual_size: u64,
    /// The source disk's size; smaller than `virtual_size` when padded.
    pub original_size: u64,
    /// Whether the size was rounded up to whole MiB (Azure's rule for VHDs).
    pub padded_to_mib: bool,
}

impl DiskDefinition {
    /// The disk at `index` in boot order.
    pub fn new(
        firmware: Firmware,
        index: usize,
        id: &str,
        path: &str,
        original_size: u64,
        virtual_size: u64,
    ) -> DiskDefinition {
        DiskDefinition {
            id: id.to_string(),
            path: path.to_string(),
            bus: DiskBus::for_disk(firmware, index),
            virtual_size,
            original_size,
            padded_to_mib: virtual_size != original_size,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicDefinition {
    /// Position in the VM spec's NIC list.
    pub index: u32,
    /// `AA:BB:CC:DD:EE:FF`, kept from the source so guest configuration bound to it still applies.
    pub mac: String,
    pub model: NicModel,
    pub source_network: String,
    pub source_ip: Option<IpAddr>,
    pub network: String,
    pub subnet: String,
    /// The libvirt network it attaches to.
    pub host_network: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    /// The target network has no route out of the host.
    pub isolated: bool,
    pub public_ip: bool,
    pub rule: Rule,
    /// Why the source IP was not kept, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    pub version: u32,
    pub name: String,
    pub firmware: Firmware,
    pub cpus: u32,
    pub memory_mib: u64,
    /// In boot order.
    pub disks: Vec<DiskDefinition>,
    pub nics: Vec<NicDefinition>,
    pub failover: FailoverInfo,
}

/// Per-NIC choices of a failover request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicOptions {
    #[serde(default)]
    pub static_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub public_ip: bool,
    /// Target `network/subnet` instead of the mapping's (planned and unplanned failovers; drills
    /// always use the mapping's test target).
    #[serde(default)]
    pub target: Option<String>,
    /// Do not create this NIC on the failed-over VM.
    #[serde(default)]
    pub skip: bool,
}

impl NicOptions {
    /// `self` where set, else `base` (request options over the VM's stored overrides).
    pub fn over(&self, base: &NicOptions) -> NicOptions {
        NicOptions {
            static_ip: self.static_ip.or(base.static_ip),
            public_ip: self.public_ip || base.public_ip,
            target: self.target.clone().or_else(|| base.target.clone()),
            skip: self.skip || base.skip,
        }
    }
}

/// libvirt (and qemu) refuse group MACs: the low bit of the first octet.
fn is_unicast_mac(mac: &str) -> bool {
    mac.get(0..2)
        .and_then(|b| u8::from_str_radix(b, 16).ok())
        .is_some_and(|b| b & 1 == 0)
}

/// Gives every NIC of `spec` its target subnet and address. All or nothing: on error
/// `allocations` is unchanged. `options` is keyed by NIC index.
pub fn assign_nics(
    config: &NetworkConfig,
    allocations: &mut Allocations,
    vm: &str,
    spec: &VmSpec,
    failover: &FailoverInfo,
    options: &BTreeMap<u32, NicOptions>,
) -> Result<Vec<NicDefinition>> {
    let firmware = Firmware::from_generation(spec.generation)?;
    if let Some(i) = options
        .keys()
        .find(|&&i| usize::try_from(i).map_or(true, |i| i >= spec.nics.len()))
    {
        return Err(Error::invalid(
            "unknown_nic",
            format!("VM {vm} has no NIC {i} ({} NICs)", spec.nics.len()),
        ));
    }
    let test = failover.kind == FailoverKind::Test;
    let mut work = allocations.clone();
    let mut out = Vec::with_capacity(spec.nics.len());
    for (i, nic) in spec.nics.iter().enumerate() {
        let index =
            u32::try_from(i).map_err(|_| Error::invalid("invalid_vm_spec", "too many NICs"))?;
        let opts = options.get(&index).cloned().unwrap_or_default();
        let mac = normalize_mac(&nic.mac)
            .filter(|m| is_unicast_mac(m))
            .ok_or_else(|| {
                Error::invalid(
                    "invalid_mac",
                    format!("NIC {i} of VM {vm}: MAC {:?} is not a unicast MAC", nic.mac),
                )
            })?;
        if opts.skip {
            continue;
        }
        let overridden = match (&opts.target, test) {
            (Some(t), false) => {
                let found = t.split_once('/').and_then(|(n, s)| {
                    config
                        .network(n)
                        .and_then(|net| net.subnet(s).map(|sub| (net, sub)))
                });
                Some(found.ok_or_else(|| {
                    Error::invalid(
                        "unknown_target_subnet",
                        format!(
                            "NIC {i} of VM {vm}: target {t:?} is not a configured network/subnet"
                        ),
                    )
                })?)
            }
            _ => None,
        };
        let (net, subnet) = overridden.or_else(|| config.target_for(&nic.network, test)).ok_or_else(|| {
            let which = if test { "test_target" } else { "target" };
            Error::invalid(
                "network_unmapped",
                format!("NIC {i} ({mac}) of VM {vm} is on source network {:?}, which has no mapping with a {which}", nic.network),
            )
        })?;
        // The spec was normalized at protection time; an unparsable address is treated as none.
        let source_ip: Option<IpAddr> = nic.ip.as_deref().and_then(|s| s.parse().ok());
        let req = NicRequest {
            vm: vm.to_string(),
            nic_index: index,
            mac: mac.clone(),
            failover_id: failover.id.clone(),
            static_ip: opts.static_ip,
            source_ip,
        };
        let got = work.assign(net, subnet, &req)?;
        let note = got
            .source_not_kept
            .as_ref()
            .zip(source_ip)
            .map(|(why, src)| format!("source IP {src} not kept: {why}"));
        out.push(NicDefinition {
            index,
            mac,
            model: NicModel::for_firmware(firmware),
            source_network: nic.network.clone(),
            source_ip,
            network: net.name().to_string(),
            subnet: subnet.name().to_string(),
            host_network: host_network_name(net.name(), subnet.name()),
            ip: got.ip,
            prefix_len: got.prefix.prefix_len(),
            gateway: subnet.gateway(),
            dns: net.dns_servers(),
            isolated: net.isolated,
            public_ip: opts.public_ip,
            rule: got.rule,
            note,
        });
    }
    *allocations = work;
    Ok(out)
}

/// Puts a definition together and checks what the renderings rely on.
pub fn build_definition(
    vm: &str,
    spec: &VmSpec,
    disks: Vec<DiskDefinition>,
    nics: Vec<NicDefinition>,
    failover: FailoverInfo,
) -> Result<VmDefinition> {
    let def = VmDefinition {
        version: DEFINITION_VERSION,
        name: vm.to_string(),
        firmware: Firmware::from_generation(spec.generation)?,
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disks,
        nics,
        failover,
    };
    def.validate()?;
    Ok(def)
}

impl VmDefinition {
    /// What every rendering assumes; also run on definitions read back from vm.json.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid("invalid_vm_definition", m));
        if self.version != DEFINITION_VERSION {
            return bad(format!(
                "definition version {} is not {DEFINITION_VERSION}",
                self.version
            ));
        }
        if !valid_name(&self.name) {
            return bad(format!("VM name {:?} is not valid", self.name));
        }
        if self.cpus == 0 || self.memory_mib == 0 {
            return bad(format!(
                "VM {}: {} CPUs and {} MiB are not a machine",
                self.name, self.cpus, self.memory_mib
            ));
        }
        if self.disks.is_empty() {
            return bad(format!("VM {} has no disk", self.name));
        }
        let mut ids = BTreeSet::new();
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_name(&d.id) || !ids.insert(d.id.as_str()) {
                return bad(format!(
                    "VM {}: disk id {:?} is invalid or repeated",
                    self.name, d.id
                ));
            }
            if d.path.is_empty() || d.path.contains(['\n', '\0']) {
                return bad(format!(
                    "VM {}: disk {} has no usable path",
                    self.name, d.id
                ));
            }
            if d.virtual_size < d.original_size
                || d.padded_to_mib != (d.virtual_size != d.original_size)
            {
                return bad(format!(
                    "VM {}: disk {}: virtual size {} vs original {} does not match padded_to_mib={}",
                    self.name, d.id, d.virtual_size, d.original_size, d.padded_to_mib
                ));
            }
            if d.bus == DiskBus::Ide && (self.firmware == Firmware::Uefi || i >= MAX_IDE_DISKS) {
                return bad(format!("VM {}: disk {} cannot be on IDE (only the first {MAX_IDE_DISKS} disks of a BIOS VM)", self.name, d.id));
            }
        }
        let mut macs = BTreeSet::new();
        for n in &self.nics {
            if normalize_mac(&n.mac).as_deref() != Some(n.mac.as_str())
                || !is_unicast_mac(&n.mac)
                || !macs.insert(n.mac.as_str())
            {
                return bad(format!(
                    "VM {}: NIC {} MAC {:?} is not a unique unicast MAC",
                    self.name, n.index, n.mac
                ));
            }
            if n.prefix_len > 32 || !valid_name(&n.network) || !valid_name(&n.subnet) {
                return bad(format!(
                    "VM {}: NIC {} has an invalid target",
                    self.name, n.index
                ));
            }
        }
        Ok(())
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::internal(format!("serializing vm.json: {e}")))
    }

    pub fn from_json(bytes: &[u8]) -> Result<VmDefinition> {
        let def: VmDefinition = serde_json::from_slice(bytes)
            .map_err(|e| Error::invalid("invalid_vm_definition", format!("vm.json: {e}")))?;
        def.validate()?;
        Ok(def)
    }
}

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
fn dns_label(s: &str) -> bool {
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
    x.push_str("  <bridge stp='on' delay='0'/>\n");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protection::spec::{DiskSpec, NicSpec};
    use std::process::{Command, Stdio};

    const CONFIG: &str = r#"
[[network]]
name = "recovery-vnet"
address_space = ["10.20.0.0/16"]
dns = ["10.20.0.10", "1.1.1.1"]
  [[network.subnet]]
  name = "app"
  prefix = "10.20.1.0/24"
  [[network.subnet]]
  name = "db"
  prefix = "10.20.2.0/24"
  gateway = "10.20.2.100"
[[network]]
name = "drill-vnet"
address_space = ["10.20.0.0/16"]
isolated = true
  [[network.subnet]]
  name = "app"
  prefix = "10.20.1.0/24"
[[mapping]]
source = "corp"
target = "recovery-vnet/app"
test_target = "drill-vnet/app"
[[mapping]]
source = "backend"
target = "recovery-vnet/db"
"#;

    fn config() -> NetworkConfig {
        NetworkConfig::from_toml(CONFIG).unwrap()
    }

    #[test]
    fn nic_overrides_skip_a_nic_and_move_one_to_another_subnet() {
        let fo = FailoverInfo::new(FailoverKind::Unplanned, "u1", "rp", 0);
        let opts: BTreeMap<u32, NicOptions> = [
            (
                0,
                NicOptions {
                    target: Some("recovery-vnet/db".into()),
                    ..Default::default()
                },
            ),
            (
                1,
                NicOptions {
                    skip: true,
                    ..Default::default()
                },
            ),
        ]
        .into();
        let mut allocs = Allocations::new();
        let nics = assign_nics(&config(), &mut allocs, "web01", &spec(1, 1), &fo, &opts).unwrap();
        assert_eq!(nics.len(), 1, "NIC 1 is skipped");
        assert_eq!((nics[0].index, nics[0].subnet.as_str()), (0, "db"));
        assert!(nics[0].ip.octets()[..3] == [10, 20, 2], "{}", nics[0].ip);

        // A drill ignores the target override (drills stay on the test network).
        let drill = FailoverInfo::new(FailoverKind::Test, "t1", "rp", 0);
        let mut allocs = Allocations::new();
        let nics =
            assign_nics(&config(), &mut allocs, "web01", &spec(1, 1), &drill, &opts).unwrap();
        assert_eq!(nics[0].network, "drill-vnet");

        // An unknown target is refused and allocates nothing.
        let bad: BTreeMap<u32, NicOptions> = [(
            0,
            NicOptions {
                target: Some("recovery-vnet/nope".into()),
                ..Default::default()
            },
        )]
        .into();
        let mut allocs = Allocations::new();
        let e = assign_nics(&config(), &mut allocs, "web01", &spec(1, 1), &fo, &bad).unwrap_err();
        assert_eq!(e.code(), "unknown_target_subnet");
        assert!(allocs.is_empty());
    }

    fn spec(generation: u8, disks: usize) -> VmSpec {
        VmSpec {
            generation,
            cpus: 2,
            memory_mib: 1024,
            disks: (0..disks)
                .map(|i| DiskSpec {
                    id: format!("disk{i}"),
                    size: 10 << 20,
                })
                .collect(),
            nics: vec![
                NicSpec {
                    network: "corp".into(),
                    mac: "00:15:5D:01:02:03".into(),
                    ip: Some("10.20.1.50".into()),
                },
                NicSpec {
                    network: "backend".into(),
                    mac: "00:15:5D:01:02:04".into(),
                    ip: Some("192.168.7.9".into()),
                },
            ],
            policy: None,
        }
    }

    fn disks(firmware: Firmware, n: usize, dir: &str) -> Vec<DiskDefinition> {
        (0..n)
            .map(|i| {
                let original = if i == 0 { (10 << 20) - 512 } else { 10 << 20 };
                DiskDefinition::new(
                    firmware,
                    i,
                    &format!("disk{i}"),
                    &format!("{dir}/disk{i}.vhd"),
                    original,
                    10 << 20,
                )
            })
            .collect()
    }

    fn definition(
        generation: u8,
        n_disks: usize,
        kind: FailoverKind,
        dir: &str,
    ) -> (VmDefinition, Allocations) {
        let s = spec(generation, n_disks);
        let fo = FailoverInfo::new(kind, "fo-1", "rp-7", 1_700_000_000);
        let mut allocs = Allocations::new();
        let opts: BTreeMap<u32, NicOptions> = [(
            0,
            NicOptions {
                static_ip: None,
                public_ip: true,
                ..Default::default()
            },
        )]
        .into();
        let nics = if kind == FailoverKind::Test {
            // backend has no test target: only the first NIC exists in drills.
            let mut s1 = s.clone();
            s1.nics.truncate(1);
            assign_nics(&config(), &mut allocs, "web01", &s1, &fo, &opts).unwrap()
        } else {
            assign_nics(&config(), &mut allocs, "web01", &s, &fo, &opts).unwrap()
        };
        let fw = Firmware::from_generation(generation).unwrap();
        (
            build_definition("web01", &s, disks(fw, n_disks, dir), nics, fo).unwrap(),
            allocs,
        )
    }

    #[test]
    fn nics_get_targets_and_addresses() {
        let (def, allocs) = definition(2, 1, FailoverKind::Planned, "/vault/fo-1");
        let [app, db] = &def.nics[..] else {
            panic!("{:?}", def.nics)
        };
        assert_eq!(
            (
                app.network.as_str(),
                app.subnet.as_str(),
                app.host_network.as_str()
            ),
            ("recovery-vnet", "app", "recovery-vnet.app")
        );
        assert_eq!(
            (app.ip, app.rule, app.prefix_len),
            ("10.20.1.50".parse().unwrap(), Rule::KeptSource, 24)
        );
        assert_eq!(app.gateway, "10.20.1.1".parse::<Ipv4Addr>().unwrap());
        assert_eq!(app.dns.len(), 2);
        assert!(app.public_ip && !app.isolated && app.note.is_none());
        assert_eq!(app.model, NicModel::Virtio);
        assert_eq!(
            (db.ip, db.rule),
            ("10.20.2.4".parse().unwrap(), Rule::NextFree)
        );
        assert_eq!(db.gateway, "10.20.2.100".parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            db.note.as_deref(),
            Some("source IP 192.168.7.9 not kept: it is outside the target subnet 10.20.2.0/24")
        );
        assert!(!db.public_ip);
        assert_eq!(allocs.len(), 2);
        // A test failover lands on the drill network.
        let (test, _) = definition(2, 1, FailoverKind::Test, "/vault/fo-1");
        assert_eq!(
            (test.nics[0].network.as_str(), test.nics[0].isolated),
            ("drill-vnet", true)
        );
    }

    #[test]
    fn nic_assignment_is_all_or_nothing() {
        let fo = FailoverInfo::new(FailoverKind::Test, "t1", "rp", 0);
        let mut allocs = Allocations::new();
        // The second NIC (backend) has no test target: nothing may stay allocated for the first.
        let e = assign_nics(
            &config(),
            &mut allocs,
            "web01",
            &spec(2, 1),
            &fo,
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "network_unmapped");
        assert!(e.to_string().contains("test_target"), "{e}");
        assert!(allocs.is_empty());

        let fo = FailoverInfo::new(FailoverKind::Unplanned, "u1", "rp", 0);
        let bad_static: BTreeMap<u32, NicOptions> = [(
            1,
            NicOptions {
                static_ip: Some("10.20.1.9".parse().unwrap()),
                public_ip: false,
                ..Default::default()
            },
        )]
        .into();
        let e = assign_nics(
            &config(),
            &mut allocs,
            "web01",
            &spec(2, 1),
            &fo,
            &bad_static,
        )
        .unwrap_err();
        assert_eq!(e.code(), "static_ip_outside_subnet");
        assert!(allocs.is_empty());

        let unknown: BTreeMap<u32, NicOptions> = [(2, NicOptions::default())].into();
        assert_eq!(
            assign_nics(&config(), &mut allocs, "web01", &spec(2, 1), &fo, &unknown)
                .unwrap_err()
                .code(),
            "unknown_nic"
        );

        let mut multicast = spec(2, 1);
        multicast.nics[1].mac = "01:00:5E:00:00:01".into();
        let e = assign_nics(
            &config(),
            &mut allocs,
            "web01",
            &multicast,
            &fo,
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "invalid_mac");
        assert!(allocs.is_empty());
    }

    #[test]
    fn definition_json_round_trips_and_is_checked() {
        let (def, _) = definition(1, 5, FailoverKind::Unplanned, "/vault/fo-1");
        assert_eq!(def.firmware, Firmware::Bios);
        let buses: Vec<DiskBus> = def.disks.iter().map(|d| d.bus).collect();
        assert_eq!(
            buses,
            [
                DiskBus::Ide,
                DiskBus::Ide,
                DiskBus::Ide,
                DiskBus::Ide,
                DiskBus::Virtio
            ]
        );
        assert!(def.disks[0].padded_to_mib && !def.disks[1].padded_to_mib);
        let json = def.to_json().unwrap();
        assert!(
            json.contains("\"firmware\": \"bios\"") && json.contains("\"rule\": \"kept_source\""),
            "{json}"
        );
        assert!(
            json.contains("\"time\": \"2023-11-14T22:13:20Z\""),
            "{json}"
        );
        assert_eq!(VmDefinition::from_json(json.as_bytes()).unwrap(), def);

        let mut cases: Vec<(&str, VmDefinition)> = Vec::new();
        let mut d = def.clone();
        d.disks.clear();
        cases.push(("no disk", d));
        let mut d = def.clone();
        d.disks[4].bus = DiskBus::Ide;
        cases.push(("fifth IDE disk", d));
        let mut d = def.clone();
        d.firmware = Firmware::Uefi;
        cases.push(("IDE on UEFI", d));
        let mut d = def.clone();
        d.disks[1].id = d.disks[0].id.clone();
        cases.push(("repeated disk id", d));
        let mut d = def.clone();
        d.disks[1].padded_to_mib = true;
        cases.push(("padding flag lies", d));
        let mut d = def.clone();
        d.nics[1].mac = d.nics[0].mac.clone();
        cases.push(("repeated MAC", d));
        let mut d = def.clone();
        d.nics[0].mac = "00:15:5d:01:02:03".into();
        cases.push(("MAC not normalized", d));
        let mut d = def.clone();
        d.name = "web'01".into();
        cases.push(("bad name", d));
        let mut d = def.clone();
        d.version = 2;
        cases.push(("future version", d));
        for (what, d) in cases {
            let e = d.validate().unwrap_err();
            assert_eq!(e.code(), "invalid_vm_definition", "{what}");
            assert!(
                VmDefinition::from_json(d.to_json().unwrap().as_bytes()).is_err(),
                "{what}"
            );
        }
        assert_eq!(
            VmDefinition::from_json(b"{}").unwrap_err().code(),
            "invalid_vm_definition"
        );
        assert_eq!(
            Firmware::from_generation(3).unwrap_err().code(),
            "invalid_vm_spec"
        );
    }

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
}
