//! Server identity (`GET /v1/server`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /v1/server`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    pub version: String,
    pub block_size: u32,
}

/// `GET /v1/servers`: the servers sharing the vault, as the answering server sees them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerList {
    pub servers: Vec<ServerView>,
    /// Seconds without a heartbeat after which a server's VMs are taken over.
    pub lease_ttl_s: u64,
}

/// One server sharing the vault.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerView {
    pub id: String,
    pub url: String,
    /// Its heartbeat changed less than one lease TTL ago (as the answering server saw it).
    pub live: bool,
    /// The server that answered.
    pub this_server: bool,
    pub started_unix: u64,
    /// Seconds since its heartbeat last changed, by the answering server's clock.
    pub last_seen_age_s: f64,
    /// The leases it holds (none shown for a server that is not live).
    pub leases: Vec<LeaseView>,
}

/// A lease a server holds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaseView {
    /// The VM's name, or `maintenance`.
    pub vm: String,
    pub epoch: u64,
    pub age_s: f64,
}
