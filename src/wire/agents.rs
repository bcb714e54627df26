//! The long-running host agent's heartbeat (`POST /v1/agent/heartbeat`): what it reports every
//! interval, and what the server answers (directives for the next interval).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Policy, ResyncBrief, VmState};

/// Sent by `drvault agent run` every heartbeat interval, for every VM in its configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The agent's version (`CARGO_PKG_VERSION` of the reference agent).
    pub agent_version: String,
    /// Seconds between this agent's heartbeats: "not reporting" counts in these intervals.
    pub interval_s: u64,
    #[serde(default)]
    pub vms: Vec<VmReport>,
}

/// One VM as its agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmReport {
    pub vm: String,
    /// False once a non-recoverable error stopped this VM's replication on the agent.
    pub replicating: bool,
    #[serde(default)]
    pub disks: Vec<DiskBacklog>,
    /// The last error the agent met for this VM (cleared by the next successful cycle).
    #[serde(default)]
    pub last_error: Option<AgentFault>,
    /// When the last cycle's logs were all acknowledged (Unix seconds).
    #[serde(default)]
    pub last_cycle_unix: Option<u64>,
}

/// Change logs of one disk that the host holds and the server has not acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskBacklog {
    pub disk: String,
    /// Bytes of closed logs waiting to be sent.
    pub backlog_bytes: u64,
    pub pending_logs: u64,
    /// When the oldest waiting log was closed (Unix seconds).
    #[serde(default)]
    pub oldest_pending_unix: Option<u64>,
}

/// An error as the agent reports it: the server's error code where it came from the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentFault {
    pub code: String,
    pub message: String,
    pub recoverable: bool,
    pub at_unix: u64,
}

/// The server's answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatAck {
    pub server_time_unix: u64,
    /// The operator's bandwidth cap for this host in MB/s (the agent uses the lower of this and
    /// its own schedule), if any.
    #[serde(default)]
    pub throttle_mb_s: Option<f64>,
    /// What the server knows of each reported VM the host may act on.
    #[serde(default)]
    pub vms: Vec<VmDirective>,
}

/// The server's view of one VM, for the agent's next interval.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmDirective {
    pub vm: String,
    /// Absent when the VM is not protected (the agent enables it).
    #[serde(default)]
    pub state: Option<VmState>,
    #[serde(default)]
    pub policy: Option<Policy>,
    /// An open resync session the agent must run (state `scheduled` or `active`).
    #[serde(default)]
    pub resync: Option<ResyncBrief>,
}
