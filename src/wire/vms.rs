//! Protected VMs: the enable-protection spec, policy, VM, disk and NIC views, block maps.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A disk's map as the export client needs it: geometry and the data blocks with their hashes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MapView {
    pub size: u64,
    pub block_size: u32,
    pub blocks: u64,
    /// Data blocks only: `[index, plain BLAKE3 hex]`; every other block is zero. At a recovery
    /// point, blocks written by logs have an empty hash (computed when the block is read; the
    /// block response carries it).
    #[schema(schema_with = super::pair_schemas::index_and_hash)]
    pub data: Vec<(u64, String)>,
    /// The recovery point these blocks are of (`None`: the base map).
    #[serde(default)]
    pub point: Option<String>,
}

/// Query of the map and block downloads: the recovery point to read (default: `latest`, the
/// newest complete point).
#[derive(Debug, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PointQuery {
    pub point: Option<String>,
}

/// One NIC of a VM and where failovers attach it (`GET /v1/vms/{vm}/nics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicMappingView {
    pub index: u32,
    pub network: String,
    pub mac: String,
    pub ip: Option<String>,
    /// `network/subnet` of planned and unplanned failovers; `None`: unmapped (they refuse).
    pub failover_target: Option<String>,
    /// `override` (the VM's NIC override) or `mapping` (the server config).
    pub failover_target_from: Option<String>,
    /// `network/subnet` of test failovers (always the mapping's test target).
    pub test_target: Option<String>,
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub static_ip: Option<std::net::Ipv4Addr>,
    pub public_ip: bool,
    /// The NIC is left out of failed-over VMs.
    pub skip: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    InitialReplication,
    Protected,
    /// A planned or unplanned failover was committed: the source's logs are refused.
    FailedOver,
    /// Protection was disabled (`drvault vm disable`): agents are refused, the points stay
    /// readable until the retention window passes, then the VM's records are removed.
    Disabled,
}

impl VmState {
    /// The state as the JSON names it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::InitialReplication => "initial_replication",
            VmState::Protected => "protected",
            VmState::FailedOver => "failed_over",
            VmState::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    /// Initial replication in progress: blocks arrive as receipts of the current session.
    Receiving,
    /// The disk's base block map is complete.
    Complete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Health {
    Normal,
    Warning,
    Critical,
}

/// A change to a VM's policy: fields left out keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    pub interval_s: Option<u64>,
    pub retention_s: Option<u64>,
    pub app_consistent_every_s: Option<u64>,
}

/// What the API shows of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub name: String,
    pub owner: String,
    pub state: VmState,
    pub health: Health,
    pub health_reasons: Vec<String>,
    /// The same reasons with their level and a machine-readable code (`host_not_reporting`,
    /// `rpo_exceeded`, the agent's error code, …), in the same order.
    #[serde(default)]
    pub health_findings: Vec<HealthFinding>,
    pub generation: u8,
    pub cpus: u32,
    pub memory_mib: u64,
    pub policy: Policy,
    pub disks: Vec<DiskView>,
    pub nics: Vec<NicSpec>,
    pub created: String,
    pub protected: Option<String>,
    pub enable_job: String,
    pub finalize_job: Option<String>,
    /// 0.0 ..= 1.0 while initial replication runs.
    pub progress: f64,
    /// Age in seconds of the latest recovery point all disks share (protected VMs only).
    pub rpo_seconds: Option<u64>,
    /// The open resync session (scheduled, active or committing), if any.
    #[serde(default)]
    pub resync: Option<ResyncBrief>,
    /// A failover that is running, or done and not yet committed (or, a drill, cleaned up):
    /// `state` stays `protected` meanwhile, as the source still replicates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverBrief>,
    /// What the owning host's agent last reported of this VM (`drvault agent run` heartbeats;
    /// absent for hosts that never sent one).
    #[serde(default)]
    pub agent: Option<AgentBrief>,
}

/// One reason of a VM's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthFinding {
    pub level: Health,
    pub code: String,
    pub reason: String,
}

/// A VM as its host's agent last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentBrief {
    pub host: String,
    pub agent_version: String,
    /// The agent's heartbeat interval, seconds.
    pub interval_s: u64,
    /// The host's last heartbeat (RFC 3339) and its age in seconds.
    pub last_contact: String,
    pub last_contact_age_s: u64,
    /// False when the agent reported replication of this VM stopped (or did not list the VM).
    pub replicating: bool,
    /// Bytes of change logs the host holds and has not sent, all disks.
    pub backlog_bytes: u64,
    pub pending_logs: u64,
    #[serde(default)]
    pub disks: Vec<super::DiskBacklog>,
    #[serde(default)]
    pub last_error: Option<super::AgentFault>,
}

/// What the VM view tells of a failover in progress or waiting for commit or cleanup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct FailoverBrief {
    pub id: String,
    /// `test`, `planned` or `unplanned`.
    pub kind: String,
    /// `running` or `succeeded`.
    pub state: String,
    pub point: Option<String>,
    /// For people: e.g. "failed over (planned), not committed".
    pub summary: String,
}

/// What the VM view tells of an open resync session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResyncBrief {
    pub session: String,
    pub state: String,
    pub reason: String,
    /// When a scheduled session may start (RFC 3339; absent: at once).
    pub not_before: Option<String>,
    pub disks: Vec<String>,
    /// Disks the agent has completed (staged).
    pub disks_done: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiskView {
    pub id: String,
    pub size: u64,
    pub block_size: u32,
    pub state: DiskState,
    pub blocks: u64,
    pub blocks_received: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    /// Plain bytes in data blocks; sealed bytes written and bytes deduplicated by initial
    /// replication (live while it runs: see `Sessions::written`).
    pub data_bytes: u64,
    pub stored_bytes: u64,
    pub deduplicated_bytes: u64,
    /// Accepted logs not yet merged.
    pub journal_length: usize,
    pub pending_log_bytes: u64,
    /// Bytes of the host's backlog (change logs not yet sent, as its agent reports them) at
    /// which the disk needs resynchronization: 50% of its size. Logs the vault keeps within
    /// retention never count.
    pub resync_threshold_bytes: u64,
    pub resync_required: Option<String>,
    pub last_log: Option<String>,
}

/// The enable-protection request body (`PUT /v1/agent/vms/{vm}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// 1 (BIOS) or 2 (UEFI).
    #[serde(default = "default_generation")]
    pub generation: u8,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    #[serde(default)]
    pub policy: Option<Policy>,
}

fn default_generation() -> u8 {
    2
}
fn default_cpus() -> u32 {
    2
}
fn default_memory() -> u64 {
    4096
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            interval_s: 300,
            retention_s: 24 * 3600,
            app_consistent_every_s: 3600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Disk id, unique within the VM (the agent defaults it to the file name).
    pub id: String,
    /// Exact virtual size in bytes.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// The source VM network the NIC is connected to (mapped to a target network at failover).
    pub network: String,
    pub mac: String,
    #[serde(default)]
    pub ip: Option<String>,
}

/// Replication policy (ASR's: interval, retention, app-consistent frequency).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Replication interval in seconds: any from 1 s (continuous) up to a day.
    pub interval_s: u64,
    /// How long recovery points are kept, in seconds (any length; default 24 h).
    pub retention_s: u64,
    /// App-consistent snapshot frequency in seconds (0 = none).
    pub app_consistent_every_s: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_state_words_are_the_json_names() {
        for s in [
            VmState::InitialReplication,
            VmState::Protected,
            VmState::FailedOver,
        ] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
    }
}

/// `POST /v1/vms/{vm}/disable`: stop protecting a VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableRequest {
    /// Remove the VM's records at once: its objects become garbage for the next collection.
    /// Without it the points stay readable until the retention window passes.
    #[serde(default)]
    pub delete_data: bool,
}

/// What a disable did (the "Disable protection" job has the same steps).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DisableReport {
    pub vm: String,
    pub job: String,
    /// The VM's records were removed (`delete_data`).
    pub deleted: bool,
    /// When the records go by themselves (RFC 3339), when they were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}
