//! Hosts and providers (`/v1/hosts`, `/v1/providers`) and the credentials they receive.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddHost {
    pub name: String,
    #[serde(default)]
    pub cloud: Option<String>,
    /// The host's cluster: any host of it may send the logs of a VM another one protected (a
    /// cluster moves VMs between its nodes; the chain continues).
    #[serde(default)]
    pub cluster: Option<String>,
}

/// What an agent needs to connect: written to a credentials file by the CLI.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Credentials {
    /// "host" or "provider".
    pub kind: String,
    pub name: String,
    pub cloud: Option<String>,
    pub server: String,
    pub token: String,
    pub ca_cert_pem: String,
    /// More URLs of servers on the same vault, tried in order after `server` when it cannot be
    /// reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub name: String,
    pub cloud: Option<String>,
    #[serde(default)]
    pub cluster: Option<String>,
    pub created: String,
    pub vms: Vec<String>,
    /// The operator's bandwidth cap for the host's agent, MB/s.
    #[serde(default)]
    pub throttle_mb_s: Option<f64>,
    /// The last heartbeat of the host's agent (RFC 3339) and its age; absent when it never sent
    /// one (hosts driven by hand with `agent protect` and `agent replicate`).
    #[serde(default)]
    pub last_contact: Option<String>,
    #[serde(default)]
    pub last_contact_age_s: Option<u64>,
    #[serde(default)]
    pub agent_version: Option<String>,
    /// Change logs the host holds and has not sent, all its VMs, bytes.
    #[serde(default)]
    pub backlog_bytes: u64,
    /// The newest error the agent reported for any of its VMs: `vm: code: message`.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The operator's bandwidth cap for a host (`PUT /v1/hosts/{name}/throttle`); `None` clears it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostThrottle {
    pub mb_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddProvider {
    pub name: String,
    pub cloud: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProviderView {
    pub name: String,
    pub cloud: String,
    pub created: String,
}
