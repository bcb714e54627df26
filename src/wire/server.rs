//! Server identity (`GET /v1/server`).

use serde::{Deserialize, Serialize};

/// `GET /v1/server`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    pub version: String,
    pub block_size: u32,
}
