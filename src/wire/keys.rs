//! Encryption keys (`/v1/keys`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `GET /v1/keys` and the answer to a rotation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeysView {
    /// The key new objects are sealed with.
    pub active: u32,
    pub keys: Vec<KeyUsage>,
}

/// What `GET /v1/keys` shows about one key (never the key itself).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct KeyUsage {
    pub id: u32,
    pub active: bool,
    pub created_unix: u64,
    /// Seals made with the key (an upper bound across restarts).
    pub seals: u64,
}
