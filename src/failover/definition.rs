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
//! - Each (network, subnet) is one libvirt network named [`host_network_name`](super::network::host_network_name): the host's
//!   address on its bridge is the subnet's gateway, DHCP serves the subnet's usable addresses
//!   and pins every allocated NIC's MAC to its IPAM address (list every allocation of the
//!   subnet, see [`dhcp_hosts`](super::libvirt::dhcp_hosts), so the dynamic range never hands out an allocated address).
//!   The configured DNS servers become dnsmasq forwarders (libvirt has no plain way to hand
//!   them out by DHCP), so guests resolve through their gateway. `isolated` networks get no
//!   `<forward>`: no route out of the host.
//! - qemu.sh puts each NIC on a tap device on the Linux bridge of its target subnet
//!   ([`bridge_name`](super::network::bridge_name), overridable per NIC), where `drvault network
//!   up` (or the libvirt network) holds the gateway address and a DHCP server with the subnet's
//!   reservations; `dhcp-hosts-<host network>.conf` beside it is the same list in dnsmasq's
//!   format for a DHCP server of the site's own. With `DRVAULT_NET=user` it uses qemu's
//!   user-mode networking instead ([`qemu_command`](super::qemu::qemu_command)): one private
//!   slirp network per NIC with the target subnet's addresses (`net=`, `host=` gateway,
//!   `dhcpstart=` the NIC's IP), a requested public address as host port forwards, no root
//!   needed, but NICs there do not see each other.

use std::collections::BTreeSet;
use std::path::Path;

use super::libvirt::{dhcp_hosts_files, libvirt_domain_xml, network_files};
use super::output::output_error;
use super::qemu::{public_forwards, qemu_script_for};
use crate::catalog::spec::normalize_mac;
use crate::error::{Error, Result};
use crate::vault::registry::valid_name;
use crate::wire::VmSpec;
pub use crate::wire::{
    DiskBus, DiskDefinition, FailoverInfo, FailoverKind, Firmware, NicDefinition, NicModel,
    NicOptions, VmDefinition,
};

/// Version of the vm.json layout; bump on any incompatible change.
pub const DEFINITION_VERSION: u32 = 1;

/// Where Debian's `ovmf` package puts the UEFI firmware code.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";

/// IDE has two channels of two devices.
const MAX_IDE_DISKS: usize = 4;

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

impl DiskBus {
    /// The bus of the disk at `index` in boot order (module doc).
    pub fn for_disk(firmware: Firmware, index: usize) -> DiskBus {
        match firmware {
            Firmware::Bios if index < MAX_IDE_DISKS => DiskBus::Ide,
            _ => DiskBus::Virtio,
        }
    }
}

impl NicModel {
    pub fn for_firmware(firmware: Firmware) -> NicModel {
        match firmware {
            Firmware::Bios => NicModel::E1000,
            Firmware::Uefi => NicModel::Virtio,
        }
    }
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
pub(super) fn is_unicast_mac(mac: &str) -> bool {
    mac.get(0..2)
        .and_then(|b| u8::from_str_radix(b, 16).ok())
        .is_some_and(|b| b & 1 == 0)
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

/// Step 4 of a failover: the definition's files next to the disks.
impl super::service::Failovers {
    /// Writes vm.json, the libvirt domain, the libvirt network and the dnsmasq DHCP hosts file of
    /// each target subnet and, when the definition can run under qemu here, qemu.sh; then syncs
    /// the folder. Returns the
    /// files' paths.
    pub(super) async fn write_definition(
        &self,
        def: &VmDefinition,
        dir: &Path,
    ) -> Result<Vec<String>> {
        let write = |name: &str, text: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::write(&p, text)
                .map_err(|e| output_error(&e, format!("writing {}: {e}", p.display())))?;
            Ok(p.display().to_string())
        };
        let mut files = vec![
            write("vm.json", &def.to_json()?)?,
            write("domain.xml", &libvirt_domain_xml(def))?,
        ];
        let allocations = self.allocations().await?;
        for (name, xml) in network_files(def, self.networks(), &allocations) {
            files.push(write(&name, &xml)?);
        }
        for (name, text) in dhcp_hosts_files(def, self.networks(), &allocations) {
            files.push(write(&name, &text)?);
        }
        match qemu_script_for(def, &public_forwards(def)) {
            Err(e) => {
                tracing::warn!(vm = %def.name, error = %e, "no qemu.sh: the definition cannot run under qemu here")
            }
            Ok(script) => files.push(write("qemu.sh", &script)?),
        }
        sync_dir(dir);
        Ok(files)
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::failover::address::{assign_nics, Allocations};
    use crate::failover::network::NetworkConfig;
    use crate::wire::{DiskSpec, NicSpec, VmSpec};
    use std::collections::BTreeMap;

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

    pub(crate) fn config() -> NetworkConfig {
        NetworkConfig::from_toml(CONFIG).unwrap()
    }

    pub(crate) fn spec(generation: u8, disks: usize) -> VmSpec {
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

    pub(crate) fn disks(firmware: Firmware, n: usize, dir: &str) -> Vec<DiskDefinition> {
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

    pub(crate) fn definition(
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
}
