//! Resynchronization: the session, what the agent is told per disk, patches, completion, and the
//! fine-hash and digest requests failback shares.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResyncState {
    Scheduled,
    Active,
    /// Every disk is staged; the switch is under way (finished at the next start if interrupted).
    Committing,
    Committed,
    Cancelled,
}

/// The vault's record of a VM's (latest) resync session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResyncSession {
    pub id: String,
    pub vm: String,
    pub state: ResyncState,
    pub reason: String,
    pub requested_unix: u64,
    /// When the session may start (the window's next opening; 0: at once).
    pub not_before_unix: u64,
    pub disks: BTreeMap<String, ResyncDisk>,
    /// The cycle the switch writes (fixed before the first disk is switched).
    pub commit_cycle: Option<u64>,
    pub job: String,
    pub finished_unix: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ResyncDisk {
    /// The replica when the session began comparing (a full map of the newest point).
    pub base_root: Option<String>,
    /// The staged map once the agent completed the disk.
    pub staged_root: Option<String>,
    pub blocks_changed: u64,
    /// Patch bytes received for this disk (the wire cost of the resync).
    pub bytes_received: u64,
}

/// What the agent is told about one disk of a session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResyncDiskView {
    pub session: String,
    pub state: ResyncState,
    pub reason: String,
    pub size: u64,
    pub block_size: u32,
    pub blocks: u64,
    pub staged: bool,
    pub blocks_changed: u64,
    /// The point the replica switched at, when the session is already committed (an agent
    /// rerun after a kill that landed past the commit: there is nothing left to send).
    #[serde(default)]
    pub commit_cycle: Option<u64>,
}

/// The answer to one patch upload.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PatchAck {
    pub index: u64,
    /// `stored`, `deduplicated`, `zero` or `already_received`.
    pub outcome: String,
    pub patch_bytes: u64,
}

/// The answer to a disk's completion.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResyncCompletion {
    pub disk: String,
    pub session: String,
    pub state: ResyncState,
    /// Disks of the session still to be completed.
    pub waiting_for: Vec<String>,
    /// The cycle of the point the switch made (once committed).
    pub cycle: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResyncRequest {
    /// Start at once instead of in the off-hours window.
    #[serde(default)]
    pub now: bool,
    /// Disks to resynchronize; default: those marked resync-required, else all.
    #[serde(default)]
    pub disks: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FineRequest {
    pub blocks: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DigestRequest {
    pub digest: String,
}
