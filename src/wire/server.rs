//! Server identity (`GET /v1/server`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /v1/server`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    pub version: String,
    pub block_size: u32,
}
