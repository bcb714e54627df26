//! Failover: the request, the record, the show view and the VM definition it writes, and the
//! per-NIC options.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    Bios,
    Uefi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    Ide,
    Virtio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    E1000,
    Virtio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailoverKind {
    Test,
    Planned,
    Unplanned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FailoverInfo {
    pub kind: FailoverKind,
    pub id: String,
    pub point_id: String,
    pub time_unix: u64,
    /// `time_unix` in RFC 3339, for people reading vm.json.
    pub time: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicDefinition {
    /// Position in the VM spec's NIC list.
    pub index: u32,
    /// `AA:BB:CC:DD:EE:FF`, kept from the source so guest configuration bound to it still applies.
    pub mac: String,
    pub model: NicModel,
    pub source_network: String,
    #[schema(value_type = Option<String>)]
    pub source_ip: Option<IpAddr>,
    pub network: String,
    pub subnet: String,
    /// The libvirt network it attaches to.
    pub host_network: String,
    #[schema(value_type = String, format = Ipv4)]
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    #[schema(value_type = String, format = Ipv4)]
    pub gateway: Ipv4Addr,
    #[schema(value_type = Vec<String>)]
    pub dns: Vec<Ipv4Addr>,
    /// The target network has no route out of the host.
    pub isolated: bool,
    pub public_ip: bool,
    pub rule: Rule,
    /// Why the source IP was not kept, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicOptions {
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Ipv4)]
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

/// Which rule gave a NIC its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Static,
    KeptSource,
    NextFree,
}

/// What the operator asks for.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    pub kind: FailoverKind,
    /// latest, latest-app, c<cycle> or an RFC 3339 time; ignored by planned failovers, which use
    /// the final point.
    #[serde(default)]
    pub point: Option<String>,
    /// Per-NIC overrides by NIC index.
    #[serde(default)]
    pub nics: BTreeMap<u32, NicOptions>,
    /// Planned failover: seconds to wait for the final logs (default from config).
    #[serde(default)]
    pub wait_s: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailoverState {
    Running,
    Succeeded,
    Failed,
    /// A drill whose output was removed; `drill_successful` says how it went.
    CleanedUp,
    Committed,
    /// The VM failed back to on-premises and is protected again.
    FailedBack,
}

/// The vault's record of a VM's current (latest) failover.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailoverRecord {
    pub id: String,
    pub vm: String,
    pub kind: FailoverKind,
    pub state: FailoverState,
    pub job: String,
    pub point: Option<String>,
    pub output_dir: String,
    pub files: Vec<String>,
    pub created_unix: u64,
    pub ended_unix: Option<u64>,
    pub error: Option<String>,
    pub drill_successful: Option<bool>,
    /// Where the disks went when the failover target is Azure storage: the `az://container/path`
    /// folder holding this failover's page blobs (its `files` name each disk's blob); the
    /// definition files stay in `output_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// What `failover show` prints.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailoverView {
    pub record: FailoverRecord,
    pub definition: Option<VmDefinition>,
    pub qemu_command: Option<Vec<String>>,
    /// Why there is no qemu command (and no qemu.sh), e.g. UEFI firmware not installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_unavailable: Option<String>,
}
