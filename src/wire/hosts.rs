//! Hosts and providers (`/v1/hosts`, `/v1/providers`) and the credentials they receive.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// "host" or "provider".
    pub kind: String,
    pub name: String,
    pub cloud: Option<String>,
    pub server: String,
    pub token: String,
    pub ca_cert_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub cloud: Option<String>,
    #[serde(default)]
    pub cluster: Option<String>,
    pub created: String,
    pub vms: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddProvider {
    pub name: String,
    pub cloud: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderView {
    pub name: String,
    pub cloud: String,
    pub created: String,
}
